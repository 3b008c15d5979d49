//! Property-based fuzzing (proptest) of every parser that takes outside input: configuration files,
//! `DEEM_*` variables and `--set` values, topology files, safetensors files, each dataset record format
//! (pairs JSONL and tar shards, MMC4, LLaVA, COCO regions and their RLE strings, POPE and RobustVQA
//! files), chat request bodies with their data URLs, and the multi-process wire header. Inputs are valid
//! files with splices of arbitrary text or bytes, or arbitrary bytes outright. The property: no panic
//! (a panic fails the case), an error that says where (checked on the messages that must name a field
//! or a file), and no more Rust heap at once than a bound derived from the input's size (measured per
//! thread by a counting allocator; libtorch's own allocations are outside it). Cases per target: `PROPTEST_CASES` (`make fuzz` runs 100 000 in all); failures
//! proptest finds are kept in `tests/proptest-regressions/fuzz.txt` and replayed first by every run.

mod common;
#[path = "common/runtime.rs"]
mod rt;
#[path = "common/synth.rs"]
mod synth_helpers;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;

/// The system allocator, counting each thread's live heap bytes and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counters only read sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        note(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` (a parser given `input` bytes) and fails the case if the heap it held at once went past
/// `per_byte × input + fixed` bytes. `fixed` covers what any input costs (a parsed config, the
/// tokenizer's work, the synthetic world's images the dataset readers decode).
fn bounded<T>(
    input: usize,
    (per_byte, fixed): (usize, usize),
    f: impl FnOnce() -> T,
) -> (T, Result<(), String>) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = (PEAK.with(Cell::get) - start).max(0) as usize;
    let bound = per_byte * input + fixed;
    let verdict = if peak <= bound {
        Ok(())
    } else {
        Err(format!(
            "held {peak} bytes at once for a {input}-byte input (bound {bound})"
        ))
    };
    (out, verdict)
}

/// Bounds of the targets: text formats hold a few times their input; image formats what their
/// pixels need (refused past `deem::data::decode::MAX_EXPANSION` decoded bytes per file byte).
const TEXT: (usize, usize) = (32, 1 << 20);
const IMAGES: (usize, usize) = (3 * deem::data::decode::MAX_EXPANSION as usize, 4 << 20);

/// `text` with `cut` bytes from `at` (as a fraction) replaced by `with`, on character boundaries.
fn splice(text: &str, at: f64, cut: usize, with: &str) -> String {
    let mut i = ((text.len() as f64) * at) as usize;
    while !text.is_char_boundary(i.min(text.len())) {
        i += 1;
    }
    let i = i.min(text.len());
    let mut j = (i + cut).min(text.len());
    while !text.is_char_boundary(j) {
        j += 1;
    }
    format!("{}{with}{}", &text[..i], &text[j..])
}

fn splice_bytes(bytes: &[u8], at: f64, cut: usize, with: &[u8]) -> Vec<u8> {
    let i = (((bytes.len() as f64) * at) as usize).min(bytes.len());
    let j = (i + cut).min(bytes.len());
    [&bytes[..i], with, &bytes[j..]].concat()
}

/// Text that looks like the pieces these formats are made of.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,12}",
        "[\\[\\]{}\",:=0-9.eE+-]{0,12}",
        Just("\u{0}".to_string()),
        Just("99999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("null".to_string()),
    ]
}

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::scratch("fuzz"))
}

/// A synthetic world the dataset targets splice into (written once).
fn world() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = common::scratch("fuzz-world");
        deem::data::synth::synthesize(&d, &synth_helpers::small(1)).unwrap();
        d
    })
}

/// A file of this test thread holding `bytes` (cases run one at a time per target).
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let id = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>();
    let p = scratch().join(format!("{id}-{name}"));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn layers(
    text: &str,
    env: Vec<(String, String)>,
    sets: Vec<String>,
) -> deem_actors::settings::Layers<'_> {
    deem_actors::settings::Layers {
        base: deem_actors::settings::BaseFile::Embedded {
            name: "fuzzed.toml",
            text,
        },
        env,
        overrides: sets,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: Some(Box::new(
        proptest::test_runner::FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/proptest-regressions/fuzz.txt")))),
        ..ProptestConfig::default() })]

    #[test]
    fn config_files_variables_and_set_values(at in 0.0..1.0f64, cut in 0usize..40, with in piece(),
            key in "[a-z_.]{1,30}", value in piece()) {
        let text = splice(deem_actors::settings::EMBEDDED_TINY, at, cut, &with);
        let (r, held) = bounded(text.len() + key.len() + value.len(), TEXT, || {
            if let Err(e) = deem_actors::settings::load(&layers(&text, vec![], vec![])) {
                prop_assert!(!e.to_string().is_empty());
            }
            let base = deem_actors::settings::EMBEDDED_TINY;
            let env = vec![(format!("DEEM_{}", key.to_uppercase().replace('.', "__")), value.clone())];
            let _ = deem_actors::settings::load(&layers(base, env, vec![]));
            let set = vec![format!("{key}={value}")];
            if let Err(e) = deem_actors::settings::load(&layers(base, vec![], set)) {
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(())
        });
        r?;
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn topology_files(at in 0.0..1.0f64, cut in 0usize..40, with in piece(), cuda in 0usize..3) {
        let cfg = rt::embedded_tiny().config;
        let text = splice(deem_actors::runtime::topology::EMBEDDED_CPU, at, cut, &with);
        let (parsed, held) = bounded(text.len(), TEXT, || {
            deem_actors::runtime::topology::Topology::parse(&text, "fuzzed.toml", &cfg, cuda).map(drop)
        });
        if let Err(e) = parsed {
            prop_assert!(e.to_string().contains("fuzzed.toml"), "{e}");
        }
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn safetensors_files(at in 0.0..1.0f64, cut in 0usize..64,
            with in proptest::collection::vec(any::<u8>(), 0..16), head in 0usize..5) {
        let good = valid_safetensors();
        let bytes = match head {
            // The header's length field, the JSON header, or anywhere.
            0 => splice_bytes(good, at * 8.0 / good.len() as f64, cut.min(8), &with),
            1 => splice_bytes(good, (8.0 + at * 120.0) / good.len() as f64, cut, &with),
            2 => splice_bytes(good, at, cut, &with),
            // The pickle detection: torch.save's zip or legacy stream signs, then anything.
            3 => [&b"PK\x03\x04"[..], &with].concat(),
            _ => [&[0x80u8, 2][..], &with].concat(),
        };
        let name = if head == 3 { "pytorch_model.bin" } else { "weights.safetensors" };
        let p = file(name, &bytes);
        let (r, held) = bounded(bytes.len(), TEXT, || {
            match deem::checkpoint::Checkpoint::open(&p) {
                Ok(ck) => {
                    for n in ck.names().map(String::from).collect::<Vec<_>>() {
                        let _ = ck.tensor(&n);
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains(&p.display().to_string()), "{e}"),
            }
            Ok(())
        });
        r?;
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn dataset_records(format in 0usize..5, at in 0.0..1.0f64, cut in 0usize..40, with in piece()) {
        let dir = world();
        let cfg = rt::embedded_tiny().config;
        let (name, ext) = [("pairs", "jsonl"), ("mmc4", "jsonl"), ("llava", "json"), ("regions", "json"),
            ("eval/regions_id", "json")][format];
        let text = std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).unwrap();
        let spliced = splice(&text, at, cut, &with);
        let p = dir.join(format!("fuzzed-{format}-{}.{ext}", file("tag", b"").file_name().unwrap().to_string_lossy()));
        std::fs::write(&p, &spliced).unwrap();
        let shown = p.display().to_string();
        let named = |e: &deem::data::DataError| e.to_string().contains(&shown);
        let (r, held) = bounded(spliced.len(), IMAGES, || {
            match format {
                0 => {
                    if let Ok(r) = deem::data::readers::read_pairs_jsonl(&p, None) {
                        prop_assert!(r.bad.iter().all(|b| b.at.contains(&shown)));
                    }
                    if let Err(e) = deem::data::stream::open_pairs_jsonl(&p, None) { prop_assert!(named(&e), "{e}") }
                }
                1 => {
                    let _ = deem::data::readers::read_mmc4(&p, None, &cfg.data.mmc4, 0);
                    if let Ok((docs, _)) = deem::data::stream::open_mmc4(&p, None, &cfg.data.mmc4, 0) {
                        use deem::data::stream::RecordSource;
                        let stats = deem::data::stream::DataStats::default();
                        for i in 0..docs.len() { let _ = docs.record(i, &stats); }
                    }
                }
                2 => {
                    if let Err(e) = deem::data::readers::read_llava(&p, None) { prop_assert!(named(&e), "{e}") }
                    let _ = deem::data::stream::open_llava(&p, None);
                }
                _ => {
                    if let Err(e) = deem::data::readers::read_regions(&p, None) { prop_assert!(named(&e), "{e}") }
                }
            }
            Ok(())
        });
        let _ = std::fs::remove_file(&p);
        r?;
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn rle_strings_and_counts(s in ".{0,40}", counts in proptest::collection::vec(any::<u32>(), 0..6),
            w in 0u32..70000, h in 0u32..70000, parts in 1u64..4) {
        // A mask is what its declared size needs (at most `MAX_MASK_PIXELS`), whatever the counts.
        let mask = (w as usize * h as usize).min(deem::data::world::MAX_MASK_PIXELS as usize);
        let (_, held) = bounded(s.len() + 4 * counts.len(), (64, mask + (64 << 10)), || {
            let _ = deem::data::world::rle_from_string(&s);
            let _ = deem::data::world::rle_decode(&counts, w, h);
        });
        prop_assert!(held.is_ok(), "{:?}", held);
        // Counts that do sum to a huge declared size: refused before the mask is allocated.
        let total = w as u64 * h as u64;
        let each = total / parts;
        if each + parts <= u32::MAX as u64 {
            let mut runs = vec![each as u32; parts as usize];
            runs[0] += (total - each * parts) as u32;
            let r = deem::data::world::rle_decode(&runs, w, h);
            prop_assert_eq!(r.is_ok(), total <= deem::data::world::MAX_MASK_PIXELS);
        }
    }

    #[test]
    fn webdataset_shards(at in 0.0..1.0f64, cut in 0usize..600,
            with in proptest::collection::vec(any::<u8>(), 0..32)) {
        let good = std::fs::read(world().join("pairs-000000.tar")).unwrap();
        let bytes = splice_bytes(&good, at, cut, &with);
        let p = file("shard.tar", &bytes);
        let (_, held) = bounded(bytes.len(), IMAGES, || {
            let _ = deem::data::readers::read_pairs_tar(&p, None);
            if let Ok((pairs, _)) = deem::data::stream::open_pairs_tar(&p) {
                use deem::data::stream::RecordSource;
                let stats = deem::data::stream::DataStats::default();
                for i in 0..pairs.len() {
                    if let Ok(deem::data::stream::Record::Pair { image, .. }) = pairs.record(i, &stats) {
                        let _ = image.decode(&stats);
                    }
                }
            }
        });
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn pope_and_robustvqa_files(which in 0usize..2, at in 0.0..1.0f64, cut in 0usize..40, with in piece()) {
        let pope = "{\"question_id\": 1, \"image\": \"a.png\", \"text\": \"Is there a dog in the image?\", \"label\": \"yes\"}\n";
        let vqa = "{\"id\": {\"image\": \"a.png\", \"question\": \"What is the main object?\", \"answer\": \"dog\", \"options\": [\"dog\", \"cat\"]}}";
        let text = splice([pope, vqa][which], at, cut, &with);
        let p = file("eval.json", text.as_bytes());
        let (r, held) = bounded(text.len(), TEXT, || {
            if which == 0 {
                deem::eval::read_pope(&p).map(drop)
            } else {
                deem::eval::read_robustvqa(&p).map(drop)
            }
        });
        if let Err(e) = r {
            prop_assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        }
        prop_assert!(held.is_ok(), "{:?}", held);
    }

    #[test]
    fn chat_request_bodies(at in 0.0..1.0f64, cut in 0usize..40, with in piece(), raw in any::<Vec<u8>>(),
            url in "data:image/(png|jpeg);base64,[A-Za-z0-9+/=]{0,64}") {
        let (cfg, tok) = serving();
        let body = format!(
            "{{\"model\": \"tiny\", \"messages\": [{{\"role\": \"user\", \"content\": [{{\"type\": \"text\", \"text\": \"hi\"}}, \
             {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"{url}\"}}}}]}}], \"max_tokens\": 4, \"stream\": true}}"
        );
        for b in [splice(&body, at, cut, &with).into_bytes(), raw] {
            let (_, held) = bounded(b.len(), IMAGES, || {
                if let Ok(r) = deem_actors::serve::openai::parse(&b) {
                    let _ = deem_actors::serve::validation::validate(r, cfg, tok, "tiny");
                }
            });
            prop_assert!(held.is_ok(), "{:?}", held);
        }
    }

    #[test]
    fn wire_headers(raw in proptest::collection::vec(any::<u8>(), 0..64), len in any::<u32>()) {
        let framed = [&len.to_le_bytes()[..], &raw].concat();
        let (_, held) = bounded(framed.len(), (64, 64 << 10), || {
            let _ = deem_actors::dist::wire::decode(&raw);
            let _ = deem_actors::dist::wire::decode(&framed);
        });
        prop_assert!(held.is_ok(), "{:?}", held);
    }
}

fn serving() -> &'static (
    deem::config::DeemConfig,
    deem::text::tokenizer::DeemTokenizer,
) {
    static S: OnceLock<(
        deem::config::DeemConfig,
        deem::text::tokenizer::DeemTokenizer,
    )> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = rt::embedded_tiny().config;
        let tok = deem::text::tokenizer::load_tokenizer(None, None, &cfg).unwrap();
        (cfg, tok)
    })
}

/// A small valid safetensors file (two tensors).
fn valid_safetensors() -> &'static Vec<u8> {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let p: &Path = &scratch().join("valid.safetensors");
        let a = tch::Tensor::arange(12, tch::kind::FLOAT_CPU).view([3, 4]);
        let b = tch::Tensor::ones([5], (tch::Kind::BFloat16, tch::Device::Cpu));
        deem::checkpoint::save(p, &[("a.weight".into(), a), ("b".into(), b)]).unwrap();
        std::fs::read(p).unwrap()
    })
}

/// A safetensors header whose length, or a tensor's offsets, claim more than the file holds is
/// refused naming the file, before any tensor is read.
#[test]
fn safetensors_claims_past_the_file_are_refused() {
    let good = valid_safetensors();
    let mut long = good.clone();
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
    let offsets = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[0,4", 1);
    assert_ne!(offsets, header);
    let mut past = (offsets.len() as u64).to_le_bytes().to_vec();
    past.extend(offsets.as_bytes());
    past.extend(&good[8 + n..]);
    for (name, bytes) in [("long.safetensors", long), ("past.safetensors", past)] {
        let p = file(name, &bytes);
        let err = deem::checkpoint::Checkpoint::open(&p)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with(&format!("{}: not a valid safetensors file", p.display())),
            "{err}"
        );
    }
}

/// A request image whose header declares far more pixels than its bytes could hold (a 4000 × 4000 PNG
/// cut to 300 bytes) is refused naming both sizes, before any pixel buffer is allocated for it.
#[test]
fn an_image_declaring_more_pixels_than_its_file_holds_is_refused_before_decoding() {
    use base64::Engine as _;
    let mut png = Vec::new();
    image::RgbImage::new(4000, 4000)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let cut = &png[..300];
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(cut)
    );
    let body = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    .to_string();
    let (cfg, tok) = serving();
    let (refused, held) = bounded(body.len(), (64, 1 << 20), || {
        let r = deem_actors::serve::openai::parse(body.as_bytes()).unwrap();
        deem_actors::serve::validation::validate(r, cfg, tok, "tiny").err()
    });
    assert_eq!(
        refused.unwrap().to_string(),
        "messages[0].content[1].image_url.url: the image declares 4000×4000 pixels but its file holds only 300 bytes: no PNG, JPEG, WebP or GIF compresses so far"
    );
    held.unwrap();
}
