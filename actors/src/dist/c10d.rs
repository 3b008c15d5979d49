//! Safe Rust over the c10d bridge (`csrc/c10d_bridge.cpp`), after PyTorch's `torch.distributed` API: a
//! [`Store`] (TCPStore) and a [`Group`] (ProcessGroupGloo, or ProcessGroupNCCL with the `nccl` feature)
//! with send / recv / isend / irecv, all_reduce (sum), broadcast and barrier. Every failure is a
//! [`DistError`] naming the rank and the operation; tensors cross by handle, without a copy.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;

use super::DistError;

type Result<T, E = DistError> = std::result::Result<T, E>;

extern "C" {
    fn deem_c10d_free_error(err: *mut c_char);
    fn deem_c10d_nccl_built() -> c_int;
    fn deem_cuda_allocator_stats(device: c_int, allocated: *mut u64, reserved: *mut u64) -> c_int;
    fn deem_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_store_free(s: *mut c_void);
    fn deem_store_set(
        s: *mut c_void,
        key: *const c_char,
        value: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_store_get(
        s: *mut c_void,
        key: *const c_char,
        value: *mut *mut u8,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_store_check(
        s: *mut c_void,
        key: *const c_char,
        found: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_store_add(
        s: *mut c_void,
        key: *const c_char,
        delta: i64,
        value: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_gloo_new(
        s: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        hostname: *const c_char,
        iface: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_nccl_new(
        s: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_group_free(g: *mut c_void);
    fn deem_isend(
        g: *mut c_void,
        t: *mut c_void,
        dst: c_int,
        tag: c_int,
        work: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_irecv(
        g: *mut c_void,
        t: *mut c_void,
        src: c_int,
        tag: c_int,
        work: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
    fn deem_work_wait(w: *mut c_void, timeout_ms: i64, err: *mut *mut c_char) -> c_int;
    fn deem_work_free(w: *mut c_void);
    fn deem_all_reduce(g: *mut c_void, t: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn deem_broadcast(g: *mut c_void, t: *mut c_void, root: c_int, err: *mut *mut c_char) -> c_int;
    fn deem_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
}

/// Whether this build carries ProcessGroupNCCL (the `nccl` cargo feature).
pub fn nccl_built() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { deem_c10d_nccl_built() != 0 }
}

/// PyTorch's CUDA caching allocator on device `index`: (bytes allocated to live tensors, bytes reserved
/// from the driver). `None` in a build without the GPU feature (`nccl`) or for a device it does not
/// know.
pub fn cuda_allocator(index: usize) -> Option<(u64, u64)> {
    if index >= tch::Cuda::device_count().max(0) as usize {
        return None;
    }
    let (mut allocated, mut reserved) = (0u64, 0u64);
    // SAFETY: the bridge writes two integers through valid pointers and catches every exception.
    let ok = unsafe { deem_cuda_allocator_stats(index as c_int, &mut allocated, &mut reserved) };
    (ok != 0).then_some((allocated, reserved))
}

/// (free, total) bytes of CUDA device `index`, from the CUDA runtime libtorch loaded
/// (`cudaMemGetInfo`); `None` without that device. The calling thread's current device is restored.
pub fn cuda_memory(index: usize) -> Option<(u64, u64)> {
    if index >= tch::Cuda::device_count().max(0) as usize {
        return None;
    }
    type GetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
    let find = |name: &CStr| {
        // SAFETY: dlsym with RTLD_DEFAULT looks a name up in the libraries already loaded.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let (get, set, info) = (
        find(c"cudaGetDevice")?,
        find(c"cudaSetDevice")?,
        find(c"cudaMemGetInfo")?,
    );
    // SAFETY: the symbols are the CUDA runtime's functions of these signatures; every pointer passed
    // is valid; each call returns an error code instead of failing.
    unsafe {
        let (get, set, info): (GetDevice, SetDevice, MemGetInfo) = (
            std::mem::transmute::<*mut c_void, GetDevice>(get),
            std::mem::transmute::<*mut c_void, SetDevice>(set),
            std::mem::transmute::<*mut c_void, MemGetInfo>(info),
        );
        let mut prev: c_int = 0;
        if get(&mut prev) != 0 || set(index as c_int) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let ok = info(&mut free, &mut total) == 0;
        set(prev);
        ok.then_some((free as u64, total as u64))
    }
}

/// Runs one bridge call; a failure becomes `DistError::C10d` naming `rank` and `op`.
fn call(rank: i64, op: &str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    let message = if err.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: the bridge hands back a NUL-terminated malloc'd string, freed here once.
        let m = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { deem_c10d_free_error(err) };
        m
    };
    Err(DistError::C10d {
        rank,
        op: op.to_string(),
        message: message.trim().to_string(),
    })
}

fn cstring(rank: i64, what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::C10d {
        rank,
        op: what.to_string(),
        message: format!("{s:?} holds a NUL byte"),
    })
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// A TCPStore client (and, on rank 0, its server): rendezvous and control values.
pub struct Store {
    ptr: *mut c_void,
    rank: i64,
}

// SAFETY: c10d's TCPStore serialises its client calls under its own lock.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Connects to `host:port` (serving it when `server`), retrying until `timeout`; every later wait
    /// on the store also ends after `timeout`.
    pub fn connect(
        host: &str,
        port: u16,
        server: bool,
        rank: i64,
        timeout: Duration,
    ) -> Result<Self> {
        let h = cstring(rank, "store connect", host)?;
        let mut ptr = std::ptr::null_mut();
        call(
            rank,
            &format!("connecting to the store at {host}:{port}"),
            |err| unsafe {
                deem_store_new(
                    h.as_ptr(),
                    port,
                    server as c_int,
                    millis(timeout),
                    &mut ptr,
                    err,
                )
            },
        )?;
        Ok(Store { ptr, rank })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstring(self.rank, "store set", key)?;
        call(self.rank, &format!("store set {key}"), |err| unsafe {
            deem_store_set(self.ptr, k.as_ptr(), value.as_ptr(), value.len(), err)
        })
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstring(self.rank, "store get", key)?;
        let (mut p, mut n) = (std::ptr::null_mut(), 0usize);
        call(self.rank, &format!("store get {key}"), |err| unsafe {
            deem_store_get(self.ptr, k.as_ptr(), &mut p, &mut n, err)
        })?;
        // SAFETY: the bridge returned `n` malloc'd bytes at `p`, freed here once.
        let v = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
        unsafe { deem_c10d_free_error(p as *mut c_char) };
        Ok(v)
    }

    /// Whether `key` is set, without waiting.
    pub fn check(&self, key: &str) -> Result<bool> {
        let k = cstring(self.rank, "store check", key)?;
        let mut found = 0;
        call(self.rank, &format!("store check {key}"), |err| unsafe {
            deem_store_check(self.ptr, k.as_ptr(), &mut found, err)
        })?;
        Ok(found != 0)
    }

    /// Waits until every one of `keys` is set, checking every 20 ms for at most `timeout`; returns the
    /// indices of those still missing then (none: all are set).
    pub fn wait_for(&self, keys: &[String], timeout: Duration) -> Result<Vec<usize>> {
        let started = std::time::Instant::now();
        loop {
            let mut missing = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                if !self.check(k)? {
                    missing.push(i);
                }
            }
            if missing.is_empty() || started.elapsed() >= timeout {
                return Ok(missing);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Adds `delta` to the counter `key`; returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstring(self.rank, "store add", key)?;
        let mut v = 0;
        call(self.rank, &format!("store add {key}"), |err| unsafe {
            deem_store_add(self.ptr, k.as_ptr(), delta, &mut v, err)
        })?;
        Ok(v)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: created by deem_store_new, freed once.
        unsafe { deem_store_free(self.ptr) }
    }
}

/// Which c10d backend a group runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors (the `nccl` feature).
    Nccl,
}

/// A c10d process group: this process is `rank` of `size`.
pub struct Group {
    ptr: *mut c_void,
    pub rank: i64,
    pub size: i64,
    /// This process's rank in the world (for messages).
    pub world_rank: i64,
    pub backend: Backend,
    timeout: Duration,
    explain: Option<Explain>,
}

/// Says what a failed group operation's error should add, when it knows (the ranks that stopped
/// answering: see `super::liveness`).
pub type Explain = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// `r`, its c10d error extended by `explain`'s account.
fn explained<T>(r: Result<T>, explain: Option<&Explain>) -> Result<T> {
    match (r, explain) {
        (Err(DistError::C10d { rank, op, message }), Some(f)) => Err(DistError::C10d {
            rank,
            op,
            message: match f() {
                Some(why) => format!("{message}; {why}"),
                None => message,
            },
        }),
        (r, _) => r,
    }
}

// SAFETY: c10d backends are built to be called from several threads; deem runs a group's collectives
// from one thread at a time (the driver), and point-to-point calls on distinct tags.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

/// Where Gloo binds: `GLOO_SOCKET_IFNAME` (as torch reads it), or `hostname`.
pub struct GlooAddr<'a> {
    pub hostname: &'a str,
    pub iface: Option<&'a str>,
}

/// Options of one new group.
pub struct GroupSpec<'a> {
    /// Keys of this group in the store live under this prefix (one per group).
    pub prefix: &'a str,
    pub rank: i64,
    pub size: i64,
    pub world_rank: i64,
    pub timeout: Duration,
}

impl Group {
    /// A Gloo group over `store`; every member calls this with the same prefix and size.
    pub fn gloo(store: &Store, spec: GroupSpec<'_>, addr: GlooAddr<'_>) -> Result<Self> {
        let r = spec.world_rank;
        let prefix = cstring(r, "new group", spec.prefix)?;
        let host = cstring(r, "new group", addr.hostname)?;
        let iface = cstring(r, "new group", addr.iface.unwrap_or(""))?;
        let mut ptr = std::ptr::null_mut();
        call(
            r,
            &format!("creating the Gloo group {}", spec.prefix),
            |err| unsafe {
                deem_gloo_new(
                    store.ptr,
                    prefix.as_ptr(),
                    spec.rank as c_int,
                    spec.size as c_int,
                    host.as_ptr(),
                    iface.as_ptr(),
                    millis(spec.timeout),
                    &mut ptr,
                    err,
                )
            },
        )?;
        Ok(Self::wrap(ptr, &spec, Backend::Gloo))
    }

    /// An NCCL group over `store` (needs the `nccl` feature and a GPU).
    pub fn nccl(store: &Store, spec: GroupSpec<'_>) -> Result<Self> {
        let r = spec.world_rank;
        let prefix = cstring(r, "new group", spec.prefix)?;
        let mut ptr = std::ptr::null_mut();
        call(
            r,
            &format!("creating the NCCL group {}", spec.prefix),
            |err| unsafe {
                deem_nccl_new(
                    store.ptr,
                    prefix.as_ptr(),
                    spec.rank as c_int,
                    spec.size as c_int,
                    millis(spec.timeout),
                    &mut ptr,
                    err,
                )
            },
        )?;
        Ok(Self::wrap(ptr, &spec, Backend::Nccl))
    }

    fn wrap(ptr: *mut c_void, spec: &GroupSpec<'_>, backend: Backend) -> Self {
        Group {
            ptr,
            rank: spec.rank,
            size: spec.size,
            world_rank: spec.world_rank,
            backend,
            timeout: spec.timeout,
            explain: None,
        }
    }

    /// The group, its failed operations' errors extended by `explain`.
    pub fn with_explain(mut self, explain: Explain) -> Self {
        self.explain = Some(explain);
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn peer(&self, op: &str, peer: i64) -> Result<()> {
        if peer < 0 || peer >= self.size || peer == self.rank {
            return Err(DistError::C10d {
                rank: self.world_rank,
                op: op.to_string(),
                message: format!(
                    "peer rank {peer} is not another member of a group of {}",
                    self.size
                ),
            });
        }
        Ok(())
    }

    /// Starts sending `t` (contiguous) to `dst` under `tag`; the returned [`Pending`] keeps it alive.
    pub fn isend(&self, t: &Tensor, dst: i64, tag: i32) -> Result<Pending> {
        self.peer("send", dst)?;
        let mut w = std::ptr::null_mut();
        let op = format!("send to rank {dst} (tag {tag})");
        call(self.world_rank, &op, |err| unsafe {
            deem_isend(
                self.ptr,
                t.as_ptr() as *mut c_void,
                dst as c_int,
                tag,
                &mut w,
                err,
            )
        })?;
        Ok(Pending::new(
            w,
            (self.world_rank, op),
            self.timeout,
            self.explain.clone(),
        ))
    }

    /// Starts receiving into `t` (contiguous, the sender's shape and dtype) from `src` under `tag`.
    pub fn irecv(&self, t: &Tensor, src: i64, tag: i32) -> Result<Pending> {
        self.peer("recv", src)?;
        let mut w = std::ptr::null_mut();
        let op = format!("receive from rank {src} (tag {tag})");
        call(self.world_rank, &op, |err| unsafe {
            deem_irecv(
                self.ptr,
                t.as_ptr() as *mut c_void,
                src as c_int,
                tag,
                &mut w,
                err,
            )
        })?;
        Ok(Pending::new(
            w,
            (self.world_rank, op),
            self.timeout,
            self.explain.clone(),
        ))
    }

    pub fn send(&self, t: &Tensor, dst: i64, tag: i32) -> Result<()> {
        self.isend(t, dst, tag)?.wait()
    }

    pub fn recv(&self, t: &Tensor, src: i64, tag: i32) -> Result<()> {
        self.irecv(t, src, tag)?.wait()
    }

    /// Sums `t` (contiguous) elementwise over the group, in place.
    pub fn all_reduce(&self, t: &Tensor) -> Result<()> {
        let r = call(self.world_rank, "all_reduce", |err| unsafe {
            deem_all_reduce(self.ptr, t.as_ptr() as *mut c_void, err)
        });
        explained(r, self.explain.as_ref())
    }

    /// Sums every tensor of `ts` over the group, in place, flattened into buckets of at most
    /// `bucket_bytes` per dtype (one all_reduce per bucket, as DDP's reducer does); returns the bytes
    /// reduced. Every member passes tensors of the same shapes in the same order.
    pub fn all_reduce_buckets(&self, ts: &[Tensor], bucket_bytes: usize) -> Result<u64> {
        let mut total = 0u64;
        let mut start = 0;
        while start < ts.len() {
            let kind = ts[start].kind();
            let mut end = start;
            let mut bytes = 0usize;
            while end < ts.len() && ts[end].kind() == kind {
                let b = ts[end].numel() * kind.elt_size_in_bytes();
                if end > start && bytes + b > bucket_bytes {
                    break;
                }
                bytes += b;
                end += 1;
            }
            let views: Vec<Tensor> = ts[start..end].iter().map(|t| t.reshape([-1])).collect();
            let flat = Tensor::cat(&views, 0);
            self.all_reduce(&flat)?;
            let mut at = 0i64;
            for t in &ts[start..end] {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&flat.narrow(0, at, n).view_as(t));
                at += n;
            }
            total += bytes as u64;
            start = end;
        }
        Ok(total)
    }

    /// Copies `root`'s `t` into every member's `t`.
    pub fn broadcast(&self, t: &Tensor, root: i64) -> Result<()> {
        self.peer_or_self("broadcast", root)?;
        let r = call(
            self.world_rank,
            &format!("broadcast from rank {root}"),
            |err| unsafe {
                deem_broadcast(self.ptr, t.as_ptr() as *mut c_void, root as c_int, err)
            },
        );
        explained(r, self.explain.as_ref())
    }

    pub fn barrier(&self) -> Result<()> {
        let r = call(self.world_rank, "barrier", |err| unsafe {
            deem_barrier(self.ptr, err)
        });
        explained(r, self.explain.as_ref())
    }

    fn peer_or_self(&self, op: &str, r: i64) -> Result<()> {
        if r == self.rank {
            Ok(())
        } else {
            self.peer(op, r)
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: created by deem_gloo_new / deem_nccl_new, freed once.
        unsafe { deem_group_free(self.ptr) }
    }
}

/// A send or receive in flight.
pub struct Pending {
    ptr: *mut c_void,
    rank: i64,
    op: String,
    timeout: Duration,
    explain: Option<Explain>,
}

// SAFETY: a c10d Work may be waited on from any thread.
unsafe impl Send for Pending {}

impl Pending {
    fn new(
        ptr: *mut c_void,
        (rank, op): (i64, String),
        timeout: Duration,
        explain: Option<Explain>,
    ) -> Self {
        Pending {
            ptr,
            rank,
            op,
            timeout,
            explain,
        }
    }

    /// Waits up to the group's timeout; a timeout or a lost peer is an error naming the operation.
    pub fn wait(self) -> Result<()> {
        let timeout = self.timeout;
        let r = call(self.rank, &self.op, |err| unsafe {
            deem_work_wait(self.ptr, millis(timeout), err)
        });
        explained(r, self.explain.as_ref())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // SAFETY: created by deem_isend / deem_irecv, freed once.
        unsafe { deem_work_free(self.ptr) }
    }
}
