//! `deem config show`: the configuration as resolved from its layers (file, `DEEM_*` variables, `--set`).

use super::ConfigCommand;
use crate::settings;

pub fn run(cmd: ConfigCommand) -> anyhow::Result<()> {
    let ConfigCommand::Show { config } = cmd;
    let cfg = config.load()?;
    print!(
        "# resolved from {} (+ DEEM_* variables and --set flags)\n{}",
        cfg.base_origin,
        settings::to_toml(&cfg.config)
    );
    Ok(())
}
