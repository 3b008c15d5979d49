//! What the pipeline benches share: the tiny configuration they time.

use deem::config::{DeemConfig, PipelineSchedule, Stage};

/// Tiny DEEM in stage I (every loss), batch 8 in `m` microbatches under `schedule`, no warm-up.
pub fn tiny(schedule: PipelineSchedule, m: u64) -> DeemConfig {
    let mut c: DeemConfig = toml::from_str(include_str!("../../../configs/tiny.toml")).unwrap();
    c.train.stage = Stage::I;
    c.train.schedule = schedule;
    c.train.batch_size = 8;
    c.train.microbatches = m;
    c.train.warmup_steps = 0;
    c
}
