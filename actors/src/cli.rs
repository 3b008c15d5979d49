//! The `deem` command line, after clap's derive style: this file holds only the argument types and the
//! dispatch; each subcommand's body is `cli/<command>.rs` with a `run(args)`. Every flag can also come
//! from a `DEEM_*` environment variable (shown in `--help`); config keys come from
//! `DEEM_<SECTION>__<KEY>` variables and `--set` (see `settings`). This is the only layer that imports
//! both `pipeline/` and `serve/`, and (with the tests) the only one that uses anyhow.

pub mod bench;
pub mod config;
pub mod data;
pub mod eval;
pub mod experiment;
pub mod forward;
pub mod info;
pub mod launch;
pub mod plan;
pub mod prefetch;
pub mod pretrain;
pub mod report;
pub mod serve;
pub mod topology;
pub mod train;
pub mod train_data;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::runtime::telemetry::{self, LogFormat};
use crate::runtime::topology::{self as topo, Topology};
use crate::settings::{self, BaseFile, Layers, LoadedConfig};

#[derive(Debug, Parser)]
#[command(
    name = "deem",
    version,
    about = "Train and serve DEEM-style multimodal models across devices"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `deem_actors=debug,warn`.
    #[arg(long, global = true, env = "DEEM_LOG", default_value = "info")]
    pub log: String,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        env = "DEEM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Versions, libtorch, CUDA devices and threads.
    Info,
    /// Check a topology against a config and print the placement.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Inspect the layered configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run one component from a checkpoint on inputs from a safetensors file; write its outputs.
    Forward(ForwardArgs),
    /// Train DEEM on the built-in synthetic batches, pipelined over the topology's actors.
    Train(TrainArgs),
    /// Serve interleaved text-and-image generation (OpenAI chat completions, SSE streaming) over the
    /// topology's actors, with /metrics, /ready and a playground page at /.
    Serve(ServeArgs),
    /// Write a report folder (report.md, report.json, losses.png) from training runs and an evaluation.
    Report(ReportArgs),
    /// RobustVQA and POPE through the generation actors (batched, greedy): a table and a JSON report.
    Eval(EvalArgs),
    /// The synthetic world and dataset files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Pretraining of components that have no checkpoint to load; `encoder`: the vision encoder,
    /// contrastively on image-caption pairs (a tiny open_clip).
    #[command(subcommand)]
    Pretrain(PretrainCommand),
    /// Experiments; `csr`: stages I + II with λ_CSR = 5 and 0 per seed, evaluated on
    /// Synthetic-RobustVQA and Synthetic-POPE (mean ± std).
    #[command(subcommand)]
    Experiment(ExperimentCommand),
    /// Time deem on a reference checkpoint (deem's side of scripts/bench_reference.py).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Start N deem processes of one world on this node (torchrun's contract: RANK, WORLD_SIZE,
    /// MASTER_ADDR …), prefix their logs with the rank, forward signals, and restart them all from the
    /// latest checkpoint when one fails, e.g. `deem launch --nproc-per-node 2 -- train --topology
    /// topologies/cpu-2proc.toml`.
    Launch(LaunchArgs),
    /// Predict memory per actor (parameters, gradients, optimizer state, activations at the schedule's
    /// peak) and the step time of training a config on a topology; refuse a placement that does not fit.
    Plan(PlanArgs),
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Processes to start on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: u32,
    /// Nodes in the world (start `deem launch` on each, with its --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: u32,
    /// This node's index (its ranks are node_rank × nproc_per_node + local rank).
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// Address of node 0, where rank 0 serves the rendezvous store.
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    #[arg(long, env = "MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Times the whole world is restarted after a rank fails.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: u32,
    /// Seconds ranks get to stop after SIGTERM before they are killed.
    #[arg(long, default_value_t = 10)]
    pub grace_seconds: u64,
    /// The deem command each rank runs (after `--`), e.g. `train --topology topologies/cpu-2proc.toml`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// `NAME=RUN_DIR` (repeatable, in training order).
    #[arg(long = "run", value_name = "NAME=DIR")]
    pub runs: Vec<String>,
    /// The JSON `deem eval --out` wrote.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// A line for the report's head (repeatable).
    #[arg(long = "note")]
    pub notes: Vec<String>,
    /// Plot CSR reconstructions of these images by this model (with --config).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// DEEM checkpoint (a `deem train` run directory or a safetensors file); the initialisation without.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// RobustVQA JSON `{split: [{file_name, gt_caption, error_caption}]}`.
    #[arg(long)]
    pub robustvqa: Option<PathBuf>,
    /// POPE-format JSON lines `{image, text, label}` (repeatable: one split per file; `pope_X.jsonl` is
    /// split `pope/X`, any other file is named by its stem).
    #[arg(long)]
    pub pope: Vec<PathBuf>,
    /// Region data (COCO-style annotations with masks and captions, as `deem train` reads; repeatable:
    /// one split per file, `regions_X.json` is `regions/X`): region-level captioning with the paper's
    /// referring prompt, scored by CIDEr-D, exact match and word F1.
    #[arg(long)]
    pub regions: Vec<PathBuf>,
    /// Tokens per answer (the reference evaluation: 10).
    #[arg(long, default_value_t = 10)]
    pub max_tokens: usize,
    /// Beam width (the reference evaluation: 3); 1 = greedy.
    #[arg(long, default_value_t = 3)]
    pub num_beams: usize,
    /// Start every answer with this text (e.g. "The answer is", as the paper's evaluation does for
    /// models instruction-tuned that way).
    #[arg(long, default_value = "")]
    pub prime: String,
    /// Write scores and answers as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum ExperimentCommand {
    Csr {
        #[command(flatten)]
        topology: TopologyArgs,
        /// The synthesized folder (with robustvqa.json and pope/ built).
        #[arg(long, default_value = "data/synth")]
        data: PathBuf,
        #[arg(long, default_value = "runs/experiment-csr")]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        seeds: u64,
        /// Stage I recipe.
        #[arg(long, default_value = "configs/tiny.toml")]
        stage1_config: PathBuf,
        /// Stage II recipe; repeat it for a curriculum: the recipes train in this order, each from the
        /// one before.
        #[arg(
            long = "stage2-config",
            value_name = "FILE",
            default_values = ["configs/tiny-stage2.toml"]
        )]
        stage2_config: Vec<PathBuf>,
        /// Stage I steps (default: the recipe's train.steps).
        #[arg(long)]
        stage1_steps: Option<u64>,
        /// Steps of each stage II recipe, in order (default: each recipe's train.steps).
        #[arg(long = "stage2-steps", value_name = "N", value_delimiter = ',')]
        stage2_steps: Vec<u64>,
        /// Pretrained components for stage I (repeatable; see `deem train --pretrained`).
        #[arg(long = "pretrained", value_name = "FILE")]
        pretrained: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PretrainCommand {
    /// Train the vision encoder against a small text tower on `DATA/pairs.jsonl` (symmetric InfoNCE);
    /// write `OUT/encoder.safetensors` (open_clip names, for `deem train --pretrained`),
    /// `OUT/clip.safetensors` (both towers, for `deem pretrain decoder`) and `OUT/encoder.jsonl`.
    Encoder {
        #[arg(long, default_value = "data/synth")]
        data: PathBuf,
        #[arg(long, default_value = "runs/pretrained")]
        out: PathBuf,
        #[arg(long, default_value_t = 1500)]
        steps: u64,
        /// Image-caption pairs per step.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The pairs file in DATA (`pairs_twins.jsonl`: each scene with its shape twin).
        #[arg(long, default_value = "pairs.jsonl")]
        pairs: String,
        /// Pairs come in groups of this many consecutive lines (a scene and its hard negatives); a
        /// batch takes whole groups.
        #[arg(long, default_value_t = 1)]
        group: usize,
        /// Instead of the pairs file, draw this many fresh scenes of the synthetic world (DATA's seed,
        /// a stream apart from every file `deem data synth` writes) with their captions, rendered in
        /// memory; with `--group 2` each comes with its shape twin (2·N pairs).
        #[arg(long, default_value_t = 0)]
        scenes: usize,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Train the LLM from scratch on text (the recipe's `train.sources`; the tiny recipe reads
    /// `DATA/text_scenes.json`, scenes in words and yes/no questions about them) with the reference
    /// trainer; write `OUT/llm.safetensors` (the LLaMA under HF names: embeddings, layers, norm, LM head;
    /// for `deem train --pretrained`), `OUT/llm.jsonl` (one line per step) and the run in `OUT/llm-run`.
    Llm {
        #[arg(long, default_value = "data/synth")]
        data: PathBuf,
        #[arg(long, default_value = "runs/pretrained")]
        out: PathBuf,
        /// Steps (default: the recipe's train.steps).
        #[arg(long)]
        steps: Option<u64>,
        /// Device of the reference trainer: `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        /// The recipe (TOML).
        #[arg(long, default_value = "configs/tiny-llm.toml")]
        config: PathBuf,
        /// Override one key, e.g. `--set train.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Train the VAE, then the UNet (conditioned on the text tower of `--clip`, the
    /// `clip.safetensors` that `deem pretrain encoder` writes) on `DATA/pairs.jsonl`; write
    /// `OUT/decoder.safetensors` (diffusers names, for `deem train --pretrained`) and `OUT/decoder.jsonl`.
    Decoder {
        #[arg(long, default_value = "data/synth")]
        data: PathBuf,
        #[arg(long, default_value = "runs/pretrained/clip.safetensors")]
        clip: PathBuf,
        #[arg(long, default_value = "runs/pretrained")]
        out: PathBuf,
        #[arg(long, default_value_t = 400)]
        vae_steps: u64,
        #[arg(long, default_value_t = 1500)]
        unet_steps: u64,
        /// Images per step.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Write the synthetic world (pairs JSONL + tar, MMC4, LLaVA, regions, evaluation splits) to a folder.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 2000)]
        pairs: usize,
        #[arg(long, default_value_t = 500)]
        documents: usize,
        #[arg(long, default_value_t = 10000)]
        instructions: usize,
        /// Most questions per instruction conversation (each has 1 to this many turns).
        #[arg(long, default_value_t = 3)]
        max_turns: usize,
        #[arg(long, default_value_t = 200)]
        regions: usize,
        /// Text-only conversations: a scene in words and a colour or label yes/no question.
        #[arg(long, default_value_t = 20000)]
        text_scenes: usize,
        /// Single-turn colour yes/no questions about images.
        #[arg(long, default_value_t = 20000)]
        colour_questions: usize,
        /// Single-turn label yes/no questions about images (existence and main object).
        #[arg(long, default_value_t = 20000)]
        label_questions: usize,
        /// Scenes written with their shape twins in `pairs_twins.jsonl` (hard negatives for
        /// `deem pretrain encoder --pairs pairs_twins.jsonl --group 2`).
        #[arg(long, default_value_t = 1000)]
        shape_twins: usize,
        #[arg(long, default_value_t = 100)]
        eval_per_split: usize,
    },
    /// Read a dataset file, report (and log) every bad record, and fail above a bad-record share.
    Check {
        #[arg(long, value_enum)]
        format: crate::cli::data::Format,
        file: PathBuf,
        /// Folder the records' image paths are relative to (default: the file's folder), e.g. LLaVA's
        /// image folder or COCO's `train2014/`.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Largest share of bad records accepted (0 to 1).
        #[arg(long, default_value_t = 0.05)]
        max_bad_ratio: f64,
        /// The configuration whose `[data]` rules (and `train.seed`) apply.
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write `robustvqa.json` for a synthesized folder's evaluation splits, hard negatives mined by the
    /// baseline classifier (nearest class prototype).
    Robustvqa {
        /// The folder `deem data synth` wrote.
        #[arg(long)]
        data: PathBuf,
        /// Keep only the images the classifier gets wrong (as the paper kept CLIP's mistakes).
        #[arg(long)]
        only_misclassified: bool,
        /// Mine the hard negatives with this trained DEEM (a run directory or model.safetensors):
        /// labels ranked by its likelihood of "A {label}." to "What is the main object in this
        /// image?". Without it, the pixel-prototype classifier.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Where to write the questions (default: DATA/robustvqa.json).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write POPE questions (random, popular, adversarial) from COCO-style instance annotations.
    Pope {
        #[arg(long)]
        instances: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Objects asked about per image (yes), and as many absent ones (no).
        #[arg(long, default_value_t = 3)]
        k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Greedy decode tokens/s of an HF LLaMA checkpoint through the serving path (KV pool).
    Decode {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 16)]
        prompt_tokens: i64,
        #[arg(long, default_value_t = 128)]
        new_tokens: i64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Intra-op threads (default: libtorch's).
        #[arg(long)]
        threads: Option<i32>,
    },
    /// DDIM steps/s of a diffusers UNet (batch 1, no guidance).
    Unet {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value_t = 50)]
        steps: i64,
        #[arg(long, default_value_t = 77)]
        context_tokens: i64,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        threads: Option<i32>,
    },
    /// Each part's cost per training microbatch on a device (forward and backward seconds, activation
    /// bytes, the optimizer step), measured with the stages' own code on the configuration's microbatch
    /// of the synthetic batches: the cost file `deem plan --costs` reads.
    Layers {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "cpu")]
        device: deem::DeviceSpec,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        threads: Option<i32>,
        /// Where to write the cost file (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `deem plan`: memory per actor and the step time of a training run, before it starts.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Plan as if this machine had N CUDA devices.
    #[arg(long, value_name = "N")]
    pub assume_cuda_devices: Option<usize>,
    /// Per-microbatch costs measured by `deem bench layers` (default: estimated from FLOPs).
    #[arg(long)]
    pub costs: Option<PathBuf>,
    /// Without --costs: sustained TFLOP/s per device for the estimate (the default, 400, is 40% of an
    /// H100's dense bf16 peak).
    #[arg(long, default_value_t = 400.0)]
    pub tflops: f64,
    /// Without --costs: tokens per row and images per row of the training data.
    #[arg(long)]
    pub tokens: Option<i64>,
    #[arg(long, default_value_t = 1)]
    pub images: i64,
    /// Without --costs: the shape of the built-in synthetic batches (`deem train` without --data).
    #[arg(long, conflicts_with_all = ["tokens", "images"])]
    pub synthetic: bool,
    /// Memory of each CUDA device in GiB (default: what the device reports; unchecked when unknown).
    #[arg(long)]
    pub device_memory_gib: Option<f64>,
    /// Move LLM layers between the shards to even their predicted times, and print that placement.
    #[arg(long)]
    pub balance: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// DEEM checkpoint: a `deem train` run directory (its model.safetensors) or a safetensors file /
    /// sharded index. Without one, the model starts from the initialisation for train.seed.
    #[arg(long, env = "DEEM_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// tokenizer.json (default: the one beside the checkpoint, else the built-in tiny tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Listen address.
    #[arg(long, env = "DEEM_SERVE_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: std::net::SocketAddr,
    /// Require `Authorization: Bearer <key>` on /v1/*.
    #[arg(long, env = "DEEM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Launched as a world: ranks other than 0 (whose /metrics is on --addr) serve /metrics and /health
    /// on this address's port + their local rank.
    #[arg(long, env = "DEEM_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Launched as one process of a world (torchrun, `deem launch`): seconds a peer may stay silent
    /// (idle links carry heartbeats) before it counts as lost; rank 0 then fails the requests in
    /// flight and turns /ready 503.
    #[arg(
        long,
        env = "DEEM_PEER_TIMEOUT",
        default_value_t = 60,
        value_name = "SECS"
    )]
    pub peer_timeout: u64,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run the reference trainer in this process on one device (`--device`) instead of the actors of
    /// the topology.
    #[arg(long)]
    pub single_process: bool,
    /// Start even when `deem plan` predicts that a CUDA device cannot hold its actors.
    #[arg(long)]
    pub skip_memory_check: bool,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Directory for steps.jsonl (one JSON line per step) and model.safetensors.
    #[arg(long, env = "DEEM_RUN_DIR", default_value = "runs/latest")]
    pub run_dir: PathBuf,
    /// Optimizer steps (default: train.steps from the config).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Device of the single-process trainer: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Serve /metrics and /health on this address while training (e.g. 127.0.0.1:9464).
    #[arg(long, env = "DEEM_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Continue from the latest checkpoint in the run directory (any topology can resume it).
    #[arg(long)]
    pub resume: bool,
    /// Train on a dataset folder (`deem data synth` output, or files in its formats) instead of the
    /// built-in batches: stage I mixes mmc4.jsonl : pairs.jsonl = 2 : 1, stages II/III use llava.json.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Start from a previous stage's model (run directory or model.safetensors).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Load pretrained components over the initialisation (repeatable): an HF LLaMA folder or file
    /// (sharded, bf16/f16/f32), a diffusers pipeline folder or its `unet/` / `vae/`, an open_clip
    /// checkpoint (its text tower is skipped), a Q-Former, or a deem model or part of one (e.g. `deem
    /// pretrain encoder`'s `encoder.safetensors`). Each path's role is recognised from its config or
    /// names; DEEM's own modules keep their initialisation; the log lists what each filled.
    #[arg(long = "pretrained", value_name = "PATH")]
    pub pretrained: Vec<PathBuf>,
    /// Stop after this many steps (a checkpoint is written) without changing the learning-rate
    /// schedule of --steps; `--resume` continues, in this or any other process layout.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// Launched as one process of a world (torchrun, `deem launch`, Slurm): seconds any wait on another
    /// rank (rendezvous, activations, gradients, all_reduce) may take before it fails naming the rank.
    #[arg(
        long,
        env = "DEEM_PEER_TIMEOUT",
        default_value_t = 300,
        value_name = "SECS"
    )]
    pub peer_timeout: u64,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// `llm` (input_ids → logits), `vision` (pixel_values → tokens, multiscale_0..3), `resampler`
    /// (image_tokens → visual_tokens, csr_condition), `unet` (sample, timestep, encoder_hidden_states →
    /// noise_pred), `vae-encode` (pixel_values → latent_mean), `vae-decode` (latents → pixel_values) or
    /// `sample` (noise, encoder_hidden_states [, uncond_hidden_states] → latents, DDIM).
    #[arg(value_enum)]
    pub component: crate::cli::forward::Component,
    /// Checkpoint file or directory (HF `save_pretrained` output, open_clip's safetensors, sharded index).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Safetensors file with the inputs.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Safetensors file to write the outputs to.
    #[arg(long)]
    pub output: PathBuf,
    /// Device to run on: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `sample`: the sampler's steps.
    #[arg(long, default_value_t = 30)]
    pub steps: i64,
    /// `sample`: the sampling loop, `ddim`, `ddpm` (needs `step_noise` [steps, B, C, H, W] in the
    /// inputs: the noise each step adds) or `dpmsolver++`.
    #[arg(long, default_value = "ddim", value_parser = parse_sampler)]
    pub scheduler: deem::config::SamplerKind,
    /// `sample`: classifier-free guidance scale (1 = none; above 1 needs `uncond_hidden_states`).
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    /// Vision and resampler sizes come from the config (the llm reads the checkpoint's config.json).
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Validate the topology and print actors, devices, layer ranges, parameters and parameter memory.
    Check {
        #[command(flatten)]
        topology: TopologyArgs,
        #[command(flatten)]
        config: ConfigArgs,
        /// Check as if this machine had N CUDA devices (plan a GPU topology from a laptop).
        #[arg(long, value_name = "N")]
        assume_cuda_devices: Option<usize>,
        /// Check against this many processes (default: the launcher's WORLD_SIZE, when set).
        #[arg(long, value_name = "N", env = "WORLD_SIZE")]
        world_size: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved configuration (file < DEEM_* variables < --set) as TOML.
    Show {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Config file (TOML); the embedded configs/tiny.toml when omitted.
    #[arg(long, env = "DEEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set train.lr=1e-4` (repeatable; wins over file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TopologyArgs {
    /// Topology file (TOML); the embedded topologies/cpu.toml when omitted.
    #[arg(long, env = "DEEM_TOPOLOGY")]
    pub topology: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<LoadedConfig, settings::ConfigError> {
        let base = match &self.config {
            Some(p) => BaseFile::Path(p),
            None => BaseFile::Embedded {
                name: settings::EMBEDDED_TINY_NAME,
                text: settings::EMBEDDED_TINY,
            },
        };
        settings::load(&Layers {
            base,
            env: settings::process_env(),
            overrides: self.overrides.clone(),
        })
    }
}

impl TopologyArgs {
    pub fn load(
        &self,
        cfg: &LoadedConfig,
        cuda_devices: usize,
    ) -> Result<Topology, topo::TopologyError> {
        match &self.topology {
            Some(p) => Topology::load(p, &cfg.config, cuda_devices),
            None => Topology::parse(
                topo::EMBEDDED_CPU,
                topo::EMBEDDED_CPU_NAME,
                &cfg.config,
                cuda_devices,
            ),
        }
    }
}

fn parse_sampler(s: &str) -> Result<deem::config::SamplerKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("expected one of ddim, ddpm, dpmsolver++, found {s}"))
}

/// Runs a parsed command line; the binary is a thin wrapper around this.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(&cli.log, cli.log_format)?;
    match cli.command {
        Command::Info => info::run(),
        Command::Topology(c) => topology::run(c),
        Command::Config(c) => config::run(c),
        Command::Forward(a) => forward::run(a),
        Command::Train(a) => train::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Report(a) => report::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Data(c) => data::run(c),
        Command::Pretrain(c) => pretrain::run(c),
        Command::Experiment(c) => experiment::run(c),
        Command::Bench(c) => bench::run(c),
        Command::Launch(a) => launch::run(a),
        Command::Plan(a) => plan::run(a),
    }
}
