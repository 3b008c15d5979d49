//! Embeds an rpath to the libtorch that torch-sys linked against, so binaries and test executables find
//! `libtorch*.so` at run time without `LD_LIBRARY_PATH`. torch-sys publishes the directory through its
//! `links = "tch"` metadata as `DEP_TCH_LIBTORCH_LIB`; the PyTorch version sits beside it in `version.py`.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // libtorch registers its CUDA backend only when libtorch_cuda.so is loaded, and nothing here calls
    // it directly: keep it (and c10_cuda) linked. Machines without a GPU load them too.
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        for arg in [
            "-Wl,--no-as-needed".to_string(),
            format!("-L{dir}"),
            "-ltorch_cuda".into(),
            "-lc10_cuda".into(),
            "-Wl,--as-needed".into(),
        ] {
            println!("cargo:rustc-link-arg={arg}");
        }
    }
    println!("cargo:rustc-env=DEEM_LIBTORCH_LIB={dir}");
    let version_py = std::path::Path::new(&dir).join("../version.py");
    let version = std::fs::read_to_string(&version_py).ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("__version__"))
            .map(|rest| {
                rest.trim_start_matches([' ', '=', ':', 's', 't', 'r'])
                    .trim()
                    .trim_matches(['\'', '"'])
                    .to_string()
            })
    });
    if let Some(v) = version {
        println!("cargo:rustc-env=DEEM_LIBTORCH_VERSION={v}");
    }
}
