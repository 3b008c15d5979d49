//! Deterministic random draws independent of libtorch's global generator, threads and devices: a
//! SplitMix64 stream per `(seed, step, microbatch, purpose)`, so a pipelined run on several actors draws
//! exactly the noise, timesteps and null-condition choices the single-process trainer drew; and FNV-1a,
//! the stable hash deem keys seeds and identifies configurations and files with.

use tch::{Kind, Tensor};

/// What a stream is for; part of the key so the draws of one purpose never shift another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    NipNoise = 1,
    NipTimesteps = 2,
    NullCondition = 3,
    CsrNoise = 4,
    CsrTimesteps = 5,
    /// Generation: the token sampler of a request (keyed by request seed and token index).
    Sampling = 6,
    /// Generation: the initial latents of a drawn image.
    ImageNoise = 7,
    /// Serving: the fixed noise of the CSR consistency score.
    CsrScore = 8,
    /// The synthetic world and dataset sampling.
    Data = 9,
    /// The mask-aware extractor's initial weights.
    RegionInit = 10,
}

#[derive(Debug, Clone)]
pub struct Stream(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

impl Stream {
    pub fn new(seed: u64, step: u64, microbatch: u64, purpose: Purpose) -> Self {
        Stream(mix(mix(mix(seed ^ 0x9e3779b97f4a7c15) ^ step)
            ^ (microbatch << 8)
            ^ purpose as u64))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        mix(self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal draws (Box–Muller) as an f32 tensor of `shape` on the CPU.
    pub fn normal(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let mut v = Vec::with_capacity(n as usize);
        while (v.len() as i64) < n {
            let u1 = self.uniform().max(f64::MIN_POSITIVE);
            let u2 = self.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((r * (std::f64::consts::TAU * u2).cos()) as f32);
            v.push((r * (std::f64::consts::TAU * u2).sin()) as f32);
        }
        v.truncate(n as usize);
        Tensor::from_slice(&v).view(shape)
    }

    /// Integers uniform in `[0, n)`.
    pub fn below(&mut self, count: usize, n: u64) -> Vec<i64> {
        (0..count)
            .map(|_| (self.uniform() * n as f64) as i64)
            .collect()
    }

    pub fn bernoulli(&mut self, count: usize, p: f64) -> Vec<bool> {
        (0..count).map(|_| self.uniform() < p).collect()
    }
}

/// Int64 tensor of `values`.
pub fn ints(values: &[i64]) -> Tensor {
    Tensor::from_slice(values).to_kind(Kind::Int64)
}

/// FNV-1a 64's offset basis: the hash of nothing.
pub const FNV1A_START: u64 = 0xcbf29ce484222325;

/// FNV-1a 64 of `bytes` continued from hash `h` (stable across builds and machines, unlike
/// `DefaultHasher`): configuration and file hashes, and the seeds of model parts.
pub fn fnv1a_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = Stream::new(7, 3, 1, Purpose::NipNoise).normal(&[1000]);
        let b = Stream::new(7, 3, 1, Purpose::NipNoise).normal(&[1000]);
        let c = Stream::new(7, 3, 2, Purpose::NipNoise).normal(&[1000]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.mean(Kind::Float).double_value(&[]);
        let std = a.std(true).double_value(&[]);
        assert!(mean.abs() < 0.1 && (std - 1.0).abs() < 0.1, "{mean} {std}");
        let t = Stream::new(1, 0, 0, Purpose::NipTimesteps).below(10_000, 1000);
        assert!(t.iter().all(|&x| (0..1000).contains(&x)));
        assert!(t.contains(&0) && t.contains(&999));
    }
}
