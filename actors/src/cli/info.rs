//! `deem info`: what the runtime sees (versions, libtorch, CUDA devices, threads).

/// `deem info` text.
pub fn info_text() -> String {
    let cuda = deem::device::cuda_device_count();
    let cuda_line = if cuda == 0 {
        "not available (0 devices)".to_string()
    } else {
        let cudnn = if tch::Cuda::cudnn_is_available() {
            format!(", cuDNN {}", tch::utils::version_cudnn())
        } else {
            String::new()
        };
        format!(
            "{cuda} device(s): {}{cudnn}",
            (0..cuda)
                .map(|i| format!("cuda:{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut s = String::new();
    s.push_str(&format!("deem {}\n", deem::VERSION));
    s.push_str(&format!("  tch crate         {}\n", deem::TCH_VERSION));
    s.push_str(&format!(
        "  libtorch          {} ({})\n",
        deem::LIBTORCH_VERSION.unwrap_or("unknown"),
        deem::LIBTORCH_LIB_DIR.unwrap_or("location unknown")
    ));
    s.push_str(&format!("  CUDA              {cuda_line}\n"));
    s.push_str(&format!(
        "  threads           intra-op {}, inter-op {} ({cores} cores available)\n",
        tch::get_num_threads(),
        tch::get_num_interop_threads()
    ));
    s.push_str(&format!(
        "  c10d              TCPStore, Gloo; NCCL {}\n",
        if crate::dist::c10d::nccl_built() {
            "built in"
        } else {
            "not built (cargo feature `nccl`)"
        }
    ));
    s.push_str(&format!(
        "  MKL / oneDNN / OpenMP  {} / {} / {}\n",
        yes(tch::utils::has_mkl()),
        yes(tch::utils::has_mkldnn()),
        yes(tch::utils::has_openmp())
    ));
    s
}

pub fn run() -> anyhow::Result<()> {
    print!("{}", info_text());
    Ok(())
}
