//! Every Prometheus metric deem exports, declared in this one module with its help text. Names follow
//! `deem_<subsystem>_<thing>_<unit>`; counters get their `_total` suffix from the encoder. Process metrics
//! use the conventional `process_*` names so stock dashboards work.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::borrow::Cow;

/// Labels of `deem_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub libtorch: String,
    pub cuda_devices: String,
}

/// Labels of `deem_http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route pattern (few values), not the raw URI.
    pub route: String,
    pub status: String,
}

/// Labels of `deem_train_loss`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    /// `total`, `ntp`, `nip` or `csr`; `contrastive`, `vae` or `unet` while `deem pretrain` runs.
    pub part: String,
}

/// Labels of the per-edge pipeline metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    /// `"<sending actor>: <edge>"`, e.g. `llm0: llm output`.
    pub edge: String,
}

/// Labels of the per-actor training metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabels {
    pub actor: String,
}

/// Labels of the per-shard serving metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

/// Labels of `deem_data_bad_records_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FormatLabels {
    /// `pairs`, `pairs-tar`, `mmc4`, `llava` or `regions`.
    pub format: String,
}

/// Labels of `deem_serve_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `stop`, `length` (finished), `cancelled`, `timeout`, `error`, `rejected` (queue full),
    /// `invalid` (422), `unauthorized`.
    pub status: String,
}

/// The generation service's metrics (`deem serve`), vLLM-style names under `deem_serve_`.
#[derive(Debug, Clone)]
pub struct ServeMetrics {
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    pub request_queue_time_seconds: Histogram,
    pub num_requests_waiting: Gauge,
    pub num_requests_running: Gauge,
    pub batch_size: Histogram,
    pub generated_tokens: Counter,
    pub prompt_tokens: Counter,
    pub generated_images: Counter,
    pub diffusion_step_seconds: Histogram,
    pub kv_cache_bytes: Family<ShardLabels, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub csr_loss: Histogram,
    pub ood_images: Counter,
}

impl ServeMetrics {
    fn register(r: &mut Registry) -> Self {
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let m = ServeMetrics {
            time_to_first_token_seconds: latency(),
            inter_token_latency_seconds: latency(),
            e2e_request_latency_seconds: latency(),
            request_queue_time_seconds: latency(),
            num_requests_waiting: Gauge::default(),
            num_requests_running: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            generated_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            generated_images: Counter::default(),
            diffusion_step_seconds: latency(),
            kv_cache_bytes: Family::default(),
            requests: Family::default(),
            csr_loss: Histogram::new(exponential_buckets(0.01, 1.5, 16)),
            ood_images: Counter::default(),
        };
        let h = |r: &mut Registry, name: &str, help: &str, x: &Histogram| {
            r.register(name, help, x.clone())
        };
        h(
            r,
            "deem_serve_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first sampled token",
            &m.time_to_first_token_seconds,
        );
        h(r, "deem_serve_inter_token_latency_seconds", "Seconds between consecutive sampled tokens of a sequence (an image drawn in between included)", &m.inter_token_latency_seconds);
        h(
            r,
            "deem_serve_e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end",
            &m.e2e_request_latency_seconds,
        );
        h(
            r,
            "deem_serve_request_queue_time_seconds",
            "Seconds a request waited in the admission queue",
            &m.request_queue_time_seconds,
        );
        r.register(
            "deem_serve_num_requests_waiting",
            "Requests in the admission queue",
            m.num_requests_waiting.clone(),
        );
        r.register(
            "deem_serve_num_requests_running",
            "Sequences admitted and not finished (decoding, drawing or encoding)",
            m.num_requests_running.clone(),
        );
        h(
            r,
            "deem_serve_batch_size_sequences",
            "Sequences in one decode tick of one micro-batch",
            &m.batch_size,
        );
        r.register(
            "deem_serve_generated_tokens",
            "Tokens sampled by the service",
            m.generated_tokens.clone(),
        );
        r.register(
            "deem_serve_prompt_tokens",
            "Prompt tokens prefilled (image tokens included)",
            m.prompt_tokens.clone(),
        );
        r.register(
            "deem_serve_generated_images",
            "Images drawn by the diffusion actor",
            m.generated_images.clone(),
        );
        h(
            r,
            "deem_serve_diffusion_step_seconds",
            "Seconds of one DDIM step of a diffusion batch (guidance doubled batch included)",
            &m.diffusion_step_seconds,
        );
        r.register("deem_serve_kv_cache_bytes", "Bytes of KV cache each LLM shard holds (the last shard: with the hidden states NIP contexts need)", m.kv_cache_bytes.clone());
        r.register(
            "deem_serve_requests",
            "Chat completion requests by outcome",
            m.requests.clone(),
        );
        h(r, "deem_serve_input_image_csr_loss", "CSR consistency score of each input image (reconstruction MSE from its own encoder embedding; dimensionless)", &m.csr_loss);
        r.register(
            "deem_serve_ood_images",
            "Input images whose CSR score exceeded serve.ood_threshold",
            m.ood_images.clone(),
        );
        m
    }
}

/// The multi-process training metrics.
#[derive(Debug)]
pub struct DistMetrics {
    /// Cross-process edges: bytes and seconds through c10d point-to-point, per edge end.
    pub p2p_bytes: Family<EdgeLabels, Counter>,
    pub p2p_seconds: Family<EdgeLabels, F64Counter>,
    /// Gradient all_reduce over the data-parallel replicas.
    pub allreduce_bytes: Counter,
    pub allreduce_seconds: F64Counter,
}

impl DistMetrics {
    fn register(r: &mut Registry) -> Self {
        let p2p_bytes = Family::<EdgeLabels, Counter>::default();
        r.register(
            "deem_p2p_bytes",
            "Bytes of activations and gradients through c10d point-to-point, per cross-process edge end",
            p2p_bytes.clone(),
        );
        let p2p_seconds = Family::<EdgeLabels, F64Counter>::default();
        r.register(
            "deem_p2p_seconds",
            "Seconds spent sending and receiving through c10d point-to-point (waiting for the peer included), per cross-process edge end",
            p2p_seconds.clone(),
        );
        let allreduce_bytes = Counter::default();
        r.register(
            "deem_allreduce_bytes",
            "Gradient bytes all-reduced over the data-parallel replicas",
            allreduce_bytes.clone(),
        );
        let allreduce_seconds = F64Counter::default();
        r.register(
            "deem_allreduce_seconds",
            "Seconds spent all-reducing gradients over the data-parallel replicas (waiting for the slowest included)",
            allreduce_seconds.clone(),
        );
        DistMetrics {
            p2p_bytes,
            p2p_seconds,
            allreduce_bytes,
            allreduce_seconds,
        }
    }
}

/// Mixed-precision training (f16's dynamic loss scale and the steps it skipped) and the memory of the
/// CUDA devices in use.
#[derive(Debug, Clone, Default)]
pub struct PrecisionMetrics {
    pub loss_scale: F64Gauge,
    pub skipped_steps: Counter,
    pub device_allocated: Family<DeviceLabels, Gauge>,
    pub device_reserved: Family<DeviceLabels, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

impl PrecisionMetrics {
    /// Samples PyTorch's caching allocator on each CUDA device of `devices` (CPU devices have no such
    /// allocator: their memory is the process's, `process_resident_memory_bytes`).
    pub fn sample_devices(&self, devices: &[deem::DeviceSpec]) {
        for d in devices {
            let tch::Device::Cuda(i) = tch::Device::from(*d) else {
                continue;
            };
            if let Some((allocated, reserved)) = crate::dist::c10d::cuda_allocator(i) {
                let labels = DeviceLabels {
                    device: d.to_string(),
                };
                self.device_allocated
                    .get_or_create(&labels)
                    .set(allocated as i64);
                self.device_reserved
                    .get_or_create(&labels)
                    .set(reserved as i64);
            }
        }
    }

    fn register(registry: &mut Registry) -> Self {
        let m = PrecisionMetrics::default();
        registry.register(
            "deem_device_memory_allocated_bytes",
            "Bytes of live tensors on each CUDA device (PyTorch's caching allocator; GPU builds)",
            m.device_allocated.clone(),
        );
        registry.register(
            "deem_device_memory_reserved_bytes",
            "Bytes PyTorch's caching allocator holds from each CUDA device's driver (GPU builds)",
            m.device_reserved.clone(),
        );
        registry.register(
            "deem_train_loss_scale",
            "f16 dynamic loss scale the last step's backward ran under (1 in f32 and bf16); dimensionless",
            m.loss_scale.clone(),
        );
        registry.register(
            "deem_train_skipped_steps",
            "Steps whose f16 gradients overflowed: the optimizer skipped them and the loss scale halved",
            m.skipped_steps.clone(),
        );
        m
    }
}

/// Streaming training data: what the data workers read and decoded, and how long the trainer waited.
#[derive(Debug, Default)]
pub struct DataMetrics {
    pub samples_read: Counter,
    pub bytes_read: Counter,
    pub decode_seconds: F64Counter,
    pub bad_images: Counter,
    pub skipped_records: Counter,
    pub queue_depth: Gauge,
    pub wait_seconds: F64Counter,
}

impl DataMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = DataMetrics::default();
        registry.register(
            "deem_data_samples_read",
            "Dataset records the data workers read from disk for training batches",
            m.samples_read.clone(),
        );
        registry.register(
            "deem_data_read_bytes",
            "Bytes of records and images the data workers read",
            m.bytes_read.clone(),
        );
        registry.register(
            "deem_data_decode_seconds",
            "Time the data workers spent reading and decoding images, summed over workers",
            m.decode_seconds.clone(),
        );
        registry.register(
            "deem_data_bad_images",
            "Images that failed to decode when a batch needed them (trained as zeros, named in the log)",
            m.bad_images.clone(),
        );
        registry.register(
            "deem_data_skipped_records",
            "Drawn records that were unreadable or longer than train.context_length (drawn again)",
            m.skipped_records.clone(),
        );
        registry.register(
            "deem_data_prefetch_queue_depth_batches",
            "Batches ready ahead of the trainer when it took its last one",
            m.queue_depth.clone(),
        );
        registry.register(
            "deem_data_wait_seconds",
            "Time the trainer waited for its next batch",
            m.wait_seconds.clone(),
        );
        m
    }

    /// Adds what `stats` counted since `last` (updated).
    pub fn sync(&self, stats: &deem::data::stream::DataStats, last: &mut [u64; 5]) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = [
            stats.samples.load(Relaxed),
            stats.bytes.load(Relaxed),
            stats.decode_nanos.load(Relaxed),
            stats.bad_images.load(Relaxed),
            stats.skipped.load(Relaxed),
        ];
        let d: Vec<u64> = now.iter().zip(*last).map(|(n, l)| n - l).collect();
        self.samples_read.inc_by(d[0]);
        self.bytes_read.inc_by(d[1]);
        self.decode_seconds.inc_by(d[2] as f64 * 1e-9);
        self.bad_images.inc_by(d[3]);
        self.skipped_records.inc_by(d[4]);
        *last = now;
    }
}

type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;
type F64Counter = Counter<f64, std::sync::atomic::AtomicU64>;

/// The registry and handles to every metric in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub build_info: Family<BuildLabels, Gauge>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub train_steps: Counter,
    pub train_loss: Family<LossLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub train_step_seconds: Histogram,
    pub train_samples_per_second: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub train_grad_norm: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub train_learning_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub train_actor_busy_seconds: Family<ActorLabels, F64Counter>,
    pub train_actor_idle_seconds: Family<ActorLabels, F64Counter>,
    pub train_bubble_ratio: F64Gauge,
    pub train_restarts: Counter,
    /// Compute threads that died, per actor (training stages and serving workers), as their supervisor
    /// heard it.
    pub actor_failures: Family<ActorLabels, Counter>,
    /// Serving workers rebuilt in place after a failure, and how long each took to run again.
    pub actor_restarts: Family<ActorLabels, Counter>,
    pub actor_recovery_seconds: Histogram,
    pub train_samples: Counter,
    pub train_tokens: Counter,
    pub pipeline_edge_bytes: Family<EdgeLabels, Counter>,
    pub pipeline_edge_queue_depth: Family<EdgeLabels, Gauge>,
    pub precision: PrecisionMetrics,
    pub data: DataMetrics,
    pub dist: DistMetrics,
    pub train_checkpoint_seconds: Histogram,
    pub serve: ServeMetrics,
    pub data_records: Family<FormatLabels, Counter>,
    pub data_bad_records: Family<FormatLabels, Counter>,
}

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_classic_text`]'s output (Prometheus text format 0.0.4).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text into the classic Prometheus text format, for scrapers and tools that do not
/// negotiate OpenMetrics (curl, older Prometheus, `promtool check metrics`): counter families are named
/// with their `_total` sample name, `info` becomes `gauge`, and `# UNIT` / `# EOF` lines are dropped.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = if *prefix == "# TYPE " && tail == "info" {
                    "gauge"
                } else {
                    tail
                };
                out.push_str(&format!("{prefix}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `deem_build_info`, registered and set.
fn build_info(registry: &mut Registry) -> Family<BuildLabels, Gauge> {
    let build_info = Family::<BuildLabels, Gauge>::default();
    registry.register(
        "deem_build_info",
        "Build of this deem process: crate version, libtorch version and visible CUDA devices (always 1)",
        build_info.clone(),
    );
    build_info
        .get_or_create(&BuildLabels {
            version: deem::VERSION.to_string(),
            libtorch: deem::LIBTORCH_VERSION.unwrap_or("unknown").to_string(),
            cuda_devices: deem::device::cuda_device_count().to_string(),
        })
        .set(1);
    build_info
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Self::in_registry(Registry::default())
    }

    /// Metrics of one rank of a multi-process job: every sample carries `rank` and `node` labels, so
    /// one Prometheus scraping every rank tells them apart.
    pub fn for_rank(rank: i64, node: &str) -> Arc<Self> {
        let labels = [
            (Cow::Borrowed("rank"), Cow::Owned(rank.to_string())),
            (Cow::Borrowed("node"), Cow::Owned(node.to_string())),
        ];
        Self::in_registry(Registry::with_labels(labels.into_iter()))
    }

    fn in_registry(mut registry: Registry) -> Arc<Self> {
        let build_info = build_info(&mut registry);
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "deem_http_requests",
            "HTTP requests served by deem's endpoints, by route and status code",
            http_requests.clone(),
        );
        let train_steps = Counter::default();
        registry.register(
            "deem_train_steps",
            "Optimizer steps completed",
            train_steps.clone(),
        );
        let train_loss = Family::<LossLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "deem_train_loss",
            "Loss of the last optimizer step by part (total = NTP + λ·NIP + λ·CSR per stage); dimensionless",
            train_loss.clone(),
        );
        let train_step_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "deem_train_step_seconds",
            "Wall time of one optimizer step (all microbatches, clip and update)",
            train_step_seconds.clone(),
        );
        let train_samples_per_second = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "deem_train_samples_per_second",
            "Training throughput over the last step, in sequences per second",
            train_samples_per_second.clone(),
        );
        let train_grad_norm = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "deem_train_grad_norm",
            "Global gradient norm of the last step before clipping; dimensionless",
            train_grad_norm.clone(),
        );
        let train_learning_rate = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "deem_train_learning_rate",
            "Learning rate of the train.lr group at the last step (after warm-up and cosine decay)",
            train_learning_rate.clone(),
        );
        let train_actor_busy_seconds = Family::<ActorLabels, F64Counter>::default();
        registry.register(
            "deem_train_actor_busy_seconds",
            "Seconds each pipeline actor spent computing",
            train_actor_busy_seconds.clone(),
        );
        let train_actor_idle_seconds = Family::<ActorLabels, F64Counter>::default();
        registry.register(
            "deem_train_actor_idle_seconds",
            "Seconds each pipeline actor spent waiting on its channels",
            train_actor_idle_seconds.clone(),
        );
        let train_bubble_ratio = F64Gauge::default();
        registry.register(
            "deem_train_bubble_ratio",
            "Share of the last step's actor time spent waiting (pipeline bubble), 0 to 1",
            train_bubble_ratio.clone(),
        );
        let train_restarts = Counter::default();
        registry.register(
            "deem_train_restarts",
            "Times the actors were restarted from the last checkpoint after a failed step",
            train_restarts.clone(),
        );
        let (actor_failures, actor_restarts, actor_recovery_seconds) = actor_metrics(&mut registry);
        let train_samples = Counter::default();
        registry.register(
            "deem_train_samples",
            "Training sequences processed",
            train_samples.clone(),
        );
        let train_tokens = Counter::default();
        registry.register(
            "deem_train_tokens",
            "Training tokens processed (image placeholders included)",
            train_tokens.clone(),
        );
        let pipeline_edge_bytes = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "deem_pipeline_edge_bytes",
            "Bytes of activations and gradients sent along each pipeline edge",
            pipeline_edge_bytes.clone(),
        );
        let pipeline_edge_queue_depth = Family::<EdgeLabels, Gauge>::default();
        registry.register(
            "deem_pipeline_edge_queue_depth_messages",
            "Deepest queue of each pipeline edge during the last step, in messages",
            pipeline_edge_queue_depth.clone(),
        );
        let dist = DistMetrics::register(&mut registry);
        let precision = PrecisionMetrics::register(&mut registry);
        let data = DataMetrics::register(&mut registry);
        let train_checkpoint_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "deem_train_checkpoint_seconds",
            "Wall time of writing one training checkpoint",
            train_checkpoint_seconds.clone(),
        );
        let serve = ServeMetrics::register(&mut registry);
        let data_records = Family::<FormatLabels, Counter>::default();
        registry.register(
            "deem_data_records",
            "Dataset records read and kept, by format",
            data_records.clone(),
        );
        let data_bad_records = Family::<FormatLabels, Counter>::default();
        registry.register(
            "deem_data_bad_records",
            "Dataset records skipped as bad (bad JSON, missing or undecodable image, malformed mask), by format",
            data_bad_records.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Arc::new(Metrics {
            registry,
            build_info,
            http_requests,
            train_steps,
            train_loss,
            train_step_seconds,
            train_samples_per_second,
            train_grad_norm,
            train_learning_rate,
            precision,
            data,
            train_actor_busy_seconds,
            train_actor_idle_seconds,
            train_bubble_ratio,
            train_restarts,
            actor_failures,
            actor_restarts,
            actor_recovery_seconds,
            train_samples,
            train_tokens,
            pipeline_edge_bytes,
            pipeline_edge_queue_depth,
            dist,
            train_checkpoint_seconds,
            serve,
            data_records,
            data_bad_records,
        })
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `process_*` metrics read from /proc on each scrape (Linux; absent elsewhere).
#[derive(Debug)]
struct ProcessCollector;

struct ProcStat {
    cpu_seconds: f64,
    start_time_seconds: f64,
    threads: i64,
    virtual_bytes: i64,
    resident_bytes: i64,
}

fn read_proc_stat() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })?;
    // Indices are the stat(5) field numbers minus 3: utime 14, stime 15, threads 20, starttime 22,
    // vsize 23, rss 24.
    Some(ProcStat {
        cpu_seconds: (num(11)? + num(12)?) / ticks,
        threads: num(17)? as i64,
        start_time_seconds: boot_time + num(19)? / ticks,
        virtual_bytes: num(20)? as i64,
        resident_bytes: (num(21)? * page) as i64,
    })
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

fn max_fds() -> Option<i64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge<
            N: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug + Send + Sync,
        >(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            value: N,
        ) -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        }
        if let Some(s) = read_proc_stat() {
            let c = ConstCounter::new(s.cpu_seconds);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process",
                s.threads,
            )?;
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                n,
            )?;
        }
        if let Some(n) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                n,
            )?;
        }
        Ok(())
    }
}

/// The supervisors' metrics: compute threads that died, the ones rebuilt in place, and how long each
/// rebuild took.
fn actor_metrics(
    registry: &mut Registry,
) -> (
    Family<ActorLabels, Counter>,
    Family<ActorLabels, Counter>,
    Histogram,
) {
    let actor_failures = Family::<ActorLabels, Counter>::default();
    registry.register(
        "deem_actor_failures",
        "Compute threads that died, per actor, as their supervisor heard it",
        actor_failures.clone(),
    );
    let actor_restarts = Family::<ActorLabels, Counter>::default();
    registry.register(
        "deem_actor_restarts",
        "Failed actors rebuilt in place by their supervisor, per actor",
        actor_restarts.clone(),
    );
    let actor_recovery_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 19));
    registry.register(
        "deem_actor_recovery_seconds",
        "Time from an actor's failure to its rebuilt incarnation running",
        actor_recovery_seconds.clone(),
    );
    (actor_failures, actor_restarts, actor_recovery_seconds)
}
