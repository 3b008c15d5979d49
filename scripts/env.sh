# Source this file (`source scripts/env.sh`) to run cargo by hand: it puts the project's virtualenv, which
# holds the torch==2.13.0 that tch links against, first on PATH. scripts/setup.sh creates the virtualenv.
_deem_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
if [ ! -x "$_deem_root/.venv/bin/python" ]; then
    echo "deem: $_deem_root/.venv is missing; run scripts/setup.sh (or make build) first" >&2
else
    export VIRTUAL_ENV="$_deem_root/.venv"
    case ":$PATH:" in
        *":$VIRTUAL_ENV/bin:"*) ;;
        *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
    esac
    export LIBTORCH_USE_PYTORCH=1
fi
unset _deem_root
