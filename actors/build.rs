//! Embeds an rpath to the libtorch that torch-sys linked against, so the `deem` binary and the test
//! executables find `libtorch*.so` at run time without `LD_LIBRARY_PATH` (see the root build.rs).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
