//! Embeds an rpath to the libtorch that torch-sys linked against, so the `deem` binary and the test
//! executables find `libtorch*.so` at run time without `LD_LIBRARY_PATH` (see the root build.rs), and
//! compiles the c10d bridge (`csrc/c10d_bridge.cpp`) against that libtorch's headers: Gloo always (its
//! headers from Debian's `libgloo-dev`), NCCL with the `nccl` feature (CUDA and NCCL headers from the
//! `nvidia-*` wheels torch installs beside itself), and links libtorch's CUDA libraries ([`link_cuda`]).
use std::path::{Path, PathBuf};

/// Links libtorch's CUDA libraries when the libtorch has them (the PyPI wheel always does), with
/// `--no-as-needed`: nothing in deem calls them directly, so the linker would otherwise drop them, and
/// libtorch registers its CUDA backend only when `libtorch_cuda.so` is loaded. Machines without a GPU
/// load them too (the wheel's libraries are there); CUDA then reports no device.
fn link_cuda(dir: &str) {
    if Path::new(dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/c10d_bridge.cpp");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not publish DEP_TCH_LIBTORCH_LIB; run scripts/setup.sh and source scripts/env.sh");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    link_cuda(&dir);
    let lib = PathBuf::from(&dir);
    let include = lib.join("../include");
    if !Path::new("/usr/include/gloo/config.h").exists() {
        panic!("Gloo's headers are missing (/usr/include/gloo); run scripts/setup.sh (it installs Debian's libgloo-dev)");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/c10d_bridge.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("USE_DISTRIBUTED", None)
        .define("USE_C10D_GLOO", None)
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // site-packages/torch/lib → site-packages
        let site = lib.join("../..");
        let nvidia = site.join("nvidia");
        if !nvidia.join("cu13/include/nv/target").exists() {
            panic!("--features nccl: CCCL's <nv/target> is missing from {}; run `bash scripts/setup.sh --nccl` (it installs nvidia-cuda-cccl)", nvidia.join("cu13/include").display());
        }
        for sub in ["cu13/include", "cu13/include/cccl", "nccl/include"] {
            build.include(nvidia.join(sub));
        }
        build.include(site.join("triton/backends/nvidia/include"));
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        build.define("DEEM_WITH_NCCL", None);
    }
    build.compile("deem_c10d");
}
