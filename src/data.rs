//! Data, after the formats DEEM's datasets ship in (image-text pairs and tar shards, MMC4, LLaVA, COCO
//! regions): their readers, the synthetic world and its writer, the mixer that turns records into
//! training sequences, and the built-in batch source the tests train on.

pub mod batches;
pub mod mixer;
pub mod readers;
pub mod synth;
pub mod world;
