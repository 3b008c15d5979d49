//! LLaMA parity with HF transformers 5.24.0 (fixtures from tests/fixtures/generate.py), pipeline shards,
//! the KV cache, sharded and DEEM-prefixed checkpoints, and the checkpoint loader's error reports.

mod common;
use common::{fixture, max_diff, read, scratch};

use std::path::{Path, PathBuf};

use deem::checkpoint::{self, Checkpoint};
use deem::models::llama::{LlamaConfig, LlamaShard};
use tch::{nn, Device, Kind, Tensor};

/// fp32 parity bound against the reference library (the issue's stated tolerance).
const TOL: f64 = 1e-4;

fn config(dir: &Path, new_tokens: i64) -> LlamaConfig {
    LlamaConfig::from_hf_file(&dir.join("config.json"), new_tokens).unwrap()
}

/// Builds the shard `[a, b)` and loads it from `ckpt`.
fn shard(
    cfg: &LlamaConfig,
    range: std::ops::Range<i64>,
    ckpt: &Path,
) -> (nn::VarStore, LlamaShard) {
    let vs = nn::VarStore::new(Device::Cpu);
    let s = LlamaShard::new(&vs.root(), cfg, range).unwrap();
    Checkpoint::open(ckpt)
        .unwrap()
        .load_into(&vs, &s.load_spec())
        .unwrap();
    (vs, s)
}

fn whole_model_parity(name: &str) -> f64 {
    let dir = fixture(name);
    let cfg = config(&dir, 0);
    let (_vs, m) = shard(&cfg, 0..cfg.num_hidden_layers, &dir);
    let ids = read(&dir.join("inputs.safetensors"), "input_ids");
    let logits = tch::no_grad(|| m.forward_ids(&ids, 0, None));
    let d = max_diff(&logits, &read(&dir.join("expected.safetensors"), "logits"));
    eprintln!("{name}: max |logits - transformers| = {d:.3e}");
    d
}

#[test]
fn logits_match_transformers_mha() {
    assert!(whole_model_parity("llama_mha") < TOL);
}

#[test]
fn logits_match_transformers_gqa() {
    assert!(whole_model_parity("llama_gqa") < TOL);
}

#[test]
fn logits_match_transformers_with_linear_rope_scaling() {
    assert!(whole_model_parity("llama_rope_linear") < TOL);
}

#[test]
fn logits_match_transformers_with_dynamic_rope_scaling() {
    let cfg = config(&fixture("llama_rope_dynamic"), 0);
    assert_eq!(
        cfg.rope_scaling,
        Some(deem::config::RopeScaling::Dynamic { factor: 4.0 })
    );
    assert!(whole_model_parity("llama_rope_dynamic") < TOL);
}

/// YaRN with a fractional ramp (not truncated) and with the truncated ramp and an mscale ratio; both
/// scale cos/sin (1.139 and 1.094).
#[test]
fn logits_match_transformers_with_yarn_rope_scaling() {
    assert!(whole_model_parity("llama_rope_yarn") < TOL);
    assert!(whole_model_parity("llama_rope_yarn_mscale") < TOL);
}

#[test]
fn logits_match_transformers_with_llama3_rope_scaling() {
    assert!(whole_model_parity("llama_rope_llama3") < TOL);
}

/// The scaled fixtures do depend on the scaling: read as plain RoPE they miss transformers' logits by far
/// more than the tolerance (so the parity tests above can fail).
#[test]
fn scaled_rope_fixtures_differ_from_plain_rope() {
    for name in [
        "llama_rope_linear",
        "llama_rope_llama3",
        "llama_rope_yarn",
        "llama_rope_yarn_mscale",
    ] {
        let dir = fixture(name);
        let mut cfg = config(&dir, 0);
        assert!(cfg.rope_scaling.is_some(), "{name}");
        cfg.rope_scaling = None;
        let (_vs, m) = shard(&cfg, 0..cfg.num_hidden_layers, &dir);
        let ids = read(&dir.join("inputs.safetensors"), "input_ids");
        let logits = tch::no_grad(|| m.forward_ids(&ids, 0, None));
        let d = max_diff(&logits, &read(&dir.join("expected.safetensors"), "logits"));
        eprintln!("{name} read as plain RoPE: max |logits - transformers| = {d:.3e}");
        assert!(d > 100.0 * TOL, "{name}: plain RoPE is only {d:.2e} away");
    }
}

/// transformers 4.x files: `rope_theta` and `rope_scaling` at the top level, the type under `type` in
/// the oldest; the same model as the 5.x `rope_parameters`.
#[test]
fn transformers_4_rope_scaling_is_read() {
    use deem::config::RopeScaling;
    let dir = scratch("rope4");
    let p = dir.join("config.json");
    let mut hf: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama_rope_llama3/config.json")).unwrap(),
    )
    .unwrap();
    let params = hf["rope_parameters"].take();
    hf.as_object_mut().unwrap().remove("rope_parameters");
    hf["rope_theta"] = params["rope_theta"].clone();
    hf["rope_scaling"] = params.clone();
    std::fs::write(&p, hf.to_string()).unwrap();
    assert_eq!(config(&dir, 0), config(&fixture("llama_rope_llama3"), 0));
    assert_eq!(
        config(&dir, 0).rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16
        })
    );
    hf["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 4.0});
    std::fs::write(&p, hf.to_string()).unwrap();
    assert_eq!(
        config(&dir, 0).rope_scaling,
        Some(RopeScaling::Linear { factor: 4.0 })
    );
    // Without original_max_position_embeddings, transformers takes max_position_embeddings.
    hf["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0});
    std::fs::write(&p, hf.to_string()).unwrap();
    assert_eq!(
        config(&dir, 0).rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        })
    );
}

#[test]
fn transformers_5_rope_parameters_are_read() {
    // llama_gqa's config.json has only `rope_parameters: {rope_theta: 500000}`.
    assert_eq!(config(&fixture("llama_gqa"), 0).rope_theta, 500000.0);
    assert_eq!(config(&fixture("llama_gqa"), 0).num_key_value_heads, 2);
}

#[test]
fn two_shards_chained_equal_the_whole_model() {
    let dir = fixture("llama_gqa");
    let cfg = config(&dir, 0);
    let ids = read(&dir.join("inputs.safetensors"), "input_ids");
    let (_a, first) = shard(&cfg, 0..1, &dir);
    let (_b, last) = shard(&cfg, 1..4, &dir);
    let (_w, whole) = shard(&cfg, 0..4, &dir);
    let (piped, full) = tch::no_grad(|| {
        let h = first.forward_layers(&first.embed(&ids), 0, None);
        let h = last.forward_layers(&h, 0, None);
        (
            last.logits(&last.norm(&h)),
            whole.forward_ids(&ids, 0, None),
        )
    });
    assert_eq!(
        max_diff(&piped, &full),
        0.0,
        "the same ops on the same weights are bit-identical"
    );
}

#[test]
fn a_shard_owns_only_its_layers() {
    let dir = fixture("llama_gqa");
    let cfg = config(&dir, 0);
    let (vs, _) = shard(&cfg, 1..3, &dir);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("model.layers.1.") || n.starts_with("model.layers.2.")),
        "{names:?}"
    );
    assert_eq!(names.len(), 2 * 9);
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for name in ["llama_gqa", "llama_rope_llama3"] {
        kv_cache_decode(name);
    }
}

fn kv_cache_decode(name: &str) {
    let dir = fixture(name);
    let cfg = config(&dir, 0);
    let (_vs, m) = shard(&cfg, 0..4, &dir);
    let ids = read(&dir.join("inputs.safetensors"), "input_ids");
    let (full, decoded) = tch::no_grad(|| {
        let full = m.forward_ids(&ids, 0, None);
        let mut cache = m.new_cache();
        let mut steps = vec![m.forward_ids(&ids.narrow(1, 0, 6), 0, Some(&mut cache))];
        for t in 6..9 {
            assert_eq!(cache.len(), t);
            steps.push(m.forward_ids(&ids.narrow(1, t, 1), t, Some(&mut cache)));
        }
        (full, Tensor::cat(&steps, 1))
    });
    let d_self = max_diff(&decoded, &full);
    let d_ref = max_diff(
        &decoded,
        &read(&dir.join("expected.safetensors"), "decoded_logits"),
    );
    eprintln!("{name} kv-cache decode: vs full recompute {d_self:.3e}, vs transformers cached decode {d_ref:.3e}");
    assert!(d_self < TOL && d_ref < TOL, "{name}");
}

#[test]
fn batched_decode_from_a_kv_pool_equals_each_sequence_alone() {
    // Sequences of different lengths in pool slots (not in slot order) decode one token each in one
    // batch; every row's logits equal the KV-cache decode of that sequence alone.
    let dir = fixture("llama_gqa");
    let cfg = config(&dir, 0);
    let (_vs, m) = shard(&cfg, 0..4, &dir);
    let ids = read(&dir.join("inputs.safetensors"), "input_ids").get(0);
    let lens = [3i64, 7, 5];
    let slots = [2i64, 0, 3];
    let next = |i: usize| ids.narrow(0, lens[i], 1).view([1, 1]);
    let (batched, alone, prefill_d) = tch::no_grad(|| {
        let mut pool = m.new_pool(4);
        let mut prefill_d: f64 = 0.0;
        let mut alone = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let prompt = ids.narrow(0, 0, n).view([1, n]);
            let h = m.forward_slot(&m.embed(&prompt), slots[i], 0, &mut pool);
            let mut c = m.new_cache();
            let reference = m.forward_ids(&prompt, 0, Some(&mut c));
            prefill_d = prefill_d.max(max_diff(&m.logits(&m.norm(&h)), &reference));
            alone.push(m.forward_ids(&next(i), n, Some(&mut c)));
        }
        let x = m.embed(&Tensor::cat(&(0..3).map(next).collect::<Vec<_>>(), 0));
        let h = m.forward_slots(&x, &slots, &lens, &mut pool);
        (m.logits(&m.norm(&h)), Tensor::cat(&alone, 0), prefill_d)
    });
    let d = max_diff(&batched, &alone);
    eprintln!(
        "kv pool: prefill vs cache {prefill_d:.3e}; batched ragged decode vs one at a time {d:.3e}"
    );
    assert!(d < 1e-5 && prefill_d < 1e-5, "{d} {prefill_d}");
}

#[test]
fn sharded_checkpoint_with_index_loads() {
    let cfg = config(&fixture("llama_gqa"), 0);
    let sharded = fixture("llama_gqa_sharded");
    let (_vs, m) = shard(&cfg, 0..4, &sharded);
    let ids = read(&fixture("llama_gqa/inputs.safetensors"), "input_ids");
    let logits = tch::no_grad(|| m.forward_ids(&ids, 0, None));
    assert!(
        max_diff(
            &logits,
            &read(&fixture("llama_gqa/expected.safetensors"), "logits")
        ) < TOL
    );
    // The last shard opens only what it needs, from the index.
    let (_vs, _) = shard(&cfg, 2..4, &sharded.join("model.safetensors.index.json"));
}

/// Rewrites the GQA checkpoint with `rename` applied to every key and `kind` as the dtype on disk.
fn rewrite(name: &str, rename: impl Fn(&str) -> Option<String>, kind: Kind) -> PathBuf {
    let src = Checkpoint::open(&fixture("llama_gqa/model.safetensors")).unwrap();
    let tensors: Vec<(String, Tensor)> = src
        .names()
        .filter_map(|n| rename(n).map(|m| (m, src.tensor(n).unwrap().unwrap().to_kind(kind))))
        .collect();
    let out = scratch(name).join("model.safetensors");
    checkpoint::save(&out, &tensors).unwrap();
    out
}

/// DEEM's whole-model names (`mm_decoder.…`) load through the one loader, which maps them onto HF's.
#[test]
fn deem_whole_model_names_load_through_the_one_loader() {
    let path = rewrite(
        "deem-prefix",
        |n| {
            Some(
                n.replace("model.", "mm_decoder.")
                    .replace("lm_head", "mm_decoder.lm_head"),
            )
        },
        Kind::Float,
    );
    let cfg = config(&fixture("llama_gqa"), 0);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = LlamaShard::new(&vs.root(), &cfg, 0..4).unwrap();
    deem::models::pretrained::Pretrained::open(&[path], None)
        .unwrap()
        .load_into(&vs, &m.load_spec(), true, |_, _| {})
        .unwrap();
    let ids = read(&fixture("llama_gqa/inputs.safetensors"), "input_ids");
    let logits = tch::no_grad(|| m.forward_ids(&ids, 0, None));
    assert!(
        max_diff(
            &logits,
            &read(&fixture("llama_gqa/expected.safetensors"), "logits")
        ) < TOL
    );
}

#[test]
fn half_precision_files_convert_to_the_compute_dtype() {
    for kind in [Kind::BFloat16, Kind::Half] {
        let path = rewrite("half", |n| Some(n.to_string()), kind);
        let cfg = config(&fixture("llama_gqa"), 0);
        let (vs, m) = shard(&cfg, 0..4, &path);
        assert!(vs.variables().values().all(|v| v.kind() == Kind::Float));
        let ids = read(&fixture("llama_gqa/inputs.safetensors"), "input_ids");
        let logits = tch::no_grad(|| m.forward_ids(&ids, 0, None));
        // Weights rounded to 8 (bf16) or 11 (f16) mantissa bits: the logits move by about that much.
        let d = max_diff(
            &logits,
            &read(&fixture("llama_gqa/expected.safetensors"), "logits"),
        );
        eprintln!("{kind:?} weights: max |logits - f32 reference| = {d:.3e}");
        assert!(d < 5e-2, "{kind:?}: {d}");
        assert!(
            d > 0.0,
            "rounding must be visible, or the file was not {kind:?}"
        );
    }
}

#[test]
fn deem_new_tokens_extend_a_plain_hf_checkpoint() {
    let dir = fixture("llama_gqa");
    let (_vs, plain) = shard(&config(&dir, 0), 0..4, &dir);
    let (_vs2, deem) = shard(&config(&dir, 6), 0..4, &dir);
    let ids = read(&dir.join("inputs.safetensors"), "input_ids");
    let (a, b) = tch::no_grad(|| {
        (
            plain.forward_ids(&ids, 0, None),
            deem.forward_ids(&ids, 0, None),
        )
    });
    assert_eq!(b.size(), vec![2, 9, 128 + 6]);
    assert_eq!(max_diff(&a, &b.narrow(2, 0, 128)), 0.0);
    // New ids embed through the new rows.
    let new_ids = Tensor::from_slice(&[128i64, 133]).view([1, 2]);
    let e = tch::no_grad(|| deem.embed(&new_ids));
    assert_eq!(e.size(), vec![1, 2, 32]);
}

// ------------------------------------------------------------------ bad checkpoints

fn load_err(path: &Path, range: std::ops::Range<i64>) -> String {
    let cfg = config(&fixture("llama_gqa"), 0);
    let vs = nn::VarStore::new(Device::Cpu);
    let s = LlamaShard::new(&vs.root(), &cfg, range).unwrap();
    match Checkpoint::open(path) {
        Err(e) => e.to_string(),
        Ok(c) => c
            .load_into(&vs, &s.load_spec())
            .expect_err("load should fail")
            .to_string(),
    }
}

#[test]
fn missing_unexpected_and_misshapen_keys_are_listed_together() {
    let path = rewrite(
        "mismatch",
        |n| match n {
            "model.layers.1.mlp.up_proj.weight" => None,
            "model.layers.0.self_attn.o_proj.weight" => {
                Some("model.layers.0.self_attn.out_proj.weight".into())
            }
            n => Some(n.to_string()),
        },
        Kind::Float,
    );
    let with_bad_shape = {
        let c = Checkpoint::open(&path).unwrap();
        let mut t: Vec<(String, Tensor)> = c
            .names()
            .map(|n| (n.to_string(), c.tensor(n).unwrap().unwrap()))
            .collect();
        for (n, v) in t.iter_mut() {
            if n == "model.norm.weight" {
                *v = Tensor::ones([31], (Kind::Float, Device::Cpu));
            }
        }
        checkpoint::save(&path, &t).unwrap();
        path
    };
    assert_eq!(
        load_err(&with_bad_shape, 0..4),
        format!(
            "{}: the checkpoint does not fit the llm shard [0, 4) module:\n  \
             missing keys (2): model.layers.0.self_attn.o_proj.weight, model.layers.1.mlp.up_proj.weight\n  \
             unexpected keys (1): model.layers.0.self_attn.out_proj.weight\n  \
             wrong shape: model.norm.weight is [31] in the file, the module expects [32]",
            with_bad_shape.display()
        )
    );
    // A shard that does not own the broken layers loads the same file cleanly… except for the norm it owns.
    assert_eq!(
        load_err(&with_bad_shape, 2..4),
        format!(
            "{}: the checkpoint does not fit the llm shard [2, 4) module:\n  \
             wrong shape: model.norm.weight is [31] in the file, the module expects [32]",
            with_bad_shape.display()
        )
    );
}

#[test]
fn truncated_files_are_reported_as_corrupt() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(fixture("llama_gqa/model.safetensors")).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&path, 0..4);
    assert!(
        err.starts_with(&format!(
            "{}: not a valid safetensors file (",
            path.display()
        )) && err.ends_with("); is it truncated or still downloading?"),
        "{err}"
    );
}

#[test]
fn pickle_checkpoints_get_conversion_advice() {
    let dir = scratch("pickle");
    let path = dir.join("pytorch_model.bin");
    std::fs::write(&path, b"PK\x03\x04 a torch.save zip archive").unwrap();
    let expected = format!(
        "{}: a PyTorch pickle checkpoint; deem reads safetensors only (pickles can run code). Convert it once with \
         Python: `from safetensors.torch import save_file; import torch; save_file(torch.load('pytorch_model.bin', \
         map_location='cpu', weights_only=True), 'pytorch_model.safetensors')`, or for a transformers/diffusers \
         model directory `Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`",
        path.display()
    );
    assert_eq!(load_err(&path, 0..4), expected);
    // A directory holding only the pickle gives the same advice.
    assert_eq!(load_err(&dir, 0..4), expected);
}

/// A safetensors file is one whatever its header length: one whose length begins with 0x80 (a pickle
/// stream's first byte) opens, it is not taken for a pickle.
#[test]
fn a_safetensors_header_length_starting_with_0x80_is_not_a_pickle() {
    let dir = scratch("header-0x80");
    let path = dir.join("weights.safetensors");
    // Lengthen the tensor name until the header's length has 0x80 as its low byte.
    for n in 1..400 {
        let name = "w".repeat(n);
        deem::checkpoint::save(
            &path,
            &[(
                name.clone(),
                tch::Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu)),
            )],
        )
        .unwrap();
        if std::fs::read(&path).unwrap()[0] == 0x80 {
            let ck = deem::checkpoint::Checkpoint::open(&path).unwrap();
            assert!(ck.contains(&name));
            return;
        }
    }
    panic!("no name length gave a header length with 0x80 as its low byte");
}

#[test]
fn an_index_naming_a_missing_file_is_reported() {
    let dir = scratch("index");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    assert_eq!(
        load_err(&dir, 0..4),
        format!(
            "{}: the index names model-00002-of-00002.safetensors for lm_head.weight, but that file is missing",
            dir.join("model.safetensors.index.json").display()
        )
    );
}

#[test]
fn unsupported_configs_are_rejected_with_the_field() {
    let dir = scratch("cfg");
    let p = dir.join("config.json");
    let base = std::fs::read_to_string(fixture("llama_gqa/config.json")).unwrap();
    std::fs::write(
        &p,
        base.replace("\"rope_type\": \"default\"", "\"rope_type\": \"longrope\""),
    )
    .unwrap();
    assert_eq!(
        LlamaConfig::from_hf_file(&p, 0).unwrap_err().to_string(),
        format!(
            "{}: rope_parameters.rope_type: expected \"default\", \"linear\", \"dynamic\", \"llama3\" or \"yarn\" (other scaled RoPE types are not supported yet), found \"longrope\"",
            p.display()
        )
    );
    let llama3 = std::fs::read_to_string(fixture("llama_rope_llama3/config.json")).unwrap();
    for (from, to, expected) in [
        (
            "\"rope_theta\": 10000.0,",
            "\"rope_theta\": 10000.0, \"partial_rotary_factor\": 0.5,",
            "partial_rotary_factor: expected 1 (rotary embeddings on the whole head), found 0.5",
        ),
        (
            "\"high_freq_factor\": 4.0",
            "\"high_freq_factor\": 1.0",
            "rope_parameters.high_freq_factor: expected more than low_freq_factor (1), found 1",
        ),
        (
            "\"factor\": 8.0",
            "\"factor\": \"8\"",
            "rope_parameters.factor: expected a number, found \"8\"",
        ),
        (
            "\"factor\": 8.0",
            "\"factor\": -2.0",
            "rope_parameters.factor: expected a positive number, found -2",
        ),
    ] {
        std::fs::write(&p, llama3.replace(from, to)).unwrap();
        assert_eq!(
            LlamaConfig::from_hf_file(&p, 0).unwrap_err().to_string(),
            format!("{}: {expected}", p.display())
        );
    }
    std::fs::write(
        &p,
        base.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    assert_eq!(
        LlamaConfig::from_hf_file(&p, 0).unwrap_err().to_string(),
        format!(
            "{}: num_key_value_heads: expected a positive divisor of num_attention_heads (4), found 3",
            p.display()
        )
    );
}

/// Packed rows with isolated documents (`train.isolate_documents`): every document's logits equal the
/// document run alone, whatever is packed before it; a fragment before a row's first BOS is a document
/// too. Without isolation the second document reads the first (so the isolation is what makes them equal).
#[test]
fn packed_documents_compute_what_each_computes_alone() {
    let dir = fixture("llama_gqa");
    let cfg = config(&dir, 0);
    let (_vs, m) = shard(&cfg, 0..4, &dir);
    let bos = 1;
    let doc = |seed: i64, len: i64| -> Vec<i64> {
        let mut d = vec![bos];
        d.extend((1..len).map(|i| 3 + (seed * 31 + i * 17) % (cfg.vocab_size - 3)));
        d
    };
    let (a, b, c, d) = (doc(1, 5), doc(2, 7), doc(3, 8), doc(4, 4));
    let fragment: Vec<i64> = vec![7, 8, 9];
    // Row 0: a, b, 3 pads; row 1: a fragment without BOS, c, d. Both 15 ids.
    let row0: Vec<i64> = [a.clone(), b.clone(), vec![0; 3]].concat();
    let row1: Vec<i64> = [fragment.clone(), c.clone(), d.clone()].concat();
    let ids = Tensor::from_slice(&[row0.clone(), row1].concat()).view([2, 15]);
    let docs = deem::models::llama::Documents::from_ids(&ids, bos);
    assert_eq!(
        Vec::<Vec<i64>>::try_from(docs.positions()).unwrap(),
        vec![
            [(0..5).collect::<Vec<_>>(), (0..10).collect()].concat(),
            [
                (0..3).collect::<Vec<_>>(),
                (0..8).collect(),
                (0..4).collect()
            ]
            .concat(),
        ]
    );
    let (packed, plain) = tch::no_grad(|| {
        let h = m.forward_documents(&m.embed(&ids), &docs);
        (
            m.logits(&m.norm(&h)),
            m.forward_ids(&ids.narrow(0, 0, 1), 0, None),
        )
    });
    let alone = |d: &[i64]| {
        tch::no_grad(|| m.forward_ids(&Tensor::from_slice(d).unsqueeze(0), 0, None)).squeeze_dim(0)
    };
    for (row, start, d) in [
        (0, 0, &a),
        (0, 5, &b),
        (1, 0, &fragment),
        (1, 3, &c),
        (1, 11, &d),
    ] {
        let got = packed.get(row).narrow(0, start, d.len() as i64);
        let diff = max_diff(&got, &alone(d));
        assert!(
            diff < 1e-5,
            "row {row} document at {start}: max diff {diff:.3e}"
        );
    }
    // The first document is unaffected either way; one causal sequence lets the second read the first.
    assert!(max_diff(&plain.get(0).narrow(0, 0, 5), &alone(&a)) < 1e-5);
    assert!(max_diff(&plain.get(0).narrow(0, 5, 7), &alone(&b)) > 1e-3);
}

/// Views (a transpose, a column slice) are written as the values they show: safetensors holds dense
/// row-major data, and libtorch refuses to write a strided view as it is.
#[test]
fn saving_views_writes_their_values() {
    let dir = scratch("save-views");
    let base = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    let views = [
        ("t".to_string(), base.tr()),
        ("cols".to_string(), base.narrow(1, 1, 2)),
    ];
    assert!(!views[0].1.is_contiguous() && !views[1].1.is_contiguous());
    let path = dir.join("views.safetensors");
    checkpoint::save(&path, &views).unwrap();
    for (name, t) in &views {
        assert_eq!(&read(&path, name), t, "{name}");
    }
}
