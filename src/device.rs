//! Device names as written in topologies and configs: `cpu` or `cuda:N`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"cpu\" or \"cuda:N\", found {0:?}")]
pub struct DeviceParseError(pub String);

impl FromStr for DeviceSpec {
    type Err = DeviceParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        s.strip_prefix("cuda:")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| DeviceParseError(s.to_string()))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceSpec> for tch::Device {
    fn from(d: DeviceSpec) -> Self {
        match d {
            DeviceSpec::Cpu => tch::Device::Cpu,
            DeviceSpec::Cuda(n) => tch::Device::Cuda(n),
        }
    }
}

/// Number of CUDA devices libtorch sees (0 on a CPU-only machine).
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for s in ["cpu", "cuda:0", "cuda:7", "cuda:12"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_other_names() {
        for s in [
            "gpu", "cuda", "cuda:", "cuda:-1", "cuda:1x", "CPU", "cuda:+1", "",
        ] {
            assert_eq!(
                s.parse::<DeviceSpec>().unwrap_err().to_string(),
                format!("expected \"cpu\" or \"cuda:N\", found {s:?}")
            );
        }
    }

    #[test]
    fn converts_to_tch() {
        assert_eq!(tch::Device::from(DeviceSpec::Cuda(3)), tch::Device::Cuda(3));
        assert_eq!(tch::Device::from(DeviceSpec::Cpu), tch::Device::Cpu);
    }
}
