//! The synthetic world written in the dataset formats users train DEEM on (`deem data synth`): pairs,
//! tar shards, MMC4 documents, LLaVA conversations, region annotations, and the evaluation sets, each
//! from a stream of its own so that one file changing leaves the others byte-identical.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use crate::data::world::{self, Scene, Split};
use crate::data::DataError;

/// How much `deem data synth` writes.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub seed: u64,
    pub size: u32,
    /// Image-text pairs (JSONL and one tar shard).
    pub pairs: usize,
    /// Interleaved documents (2–4 images each).
    pub documents: usize,
    /// Instruction conversations.
    pub instructions: usize,
    /// Most questions (turns) per instruction conversation; each has 1 to this many.
    pub max_turns: usize,
    /// Region annotations' images.
    pub regions: usize,
    /// Text-only conversations that describe a scene in words and ask whether a colour or a label is
    /// in it (`text_scenes.json`): the comparison the tiny LLM learns in its pretraining.
    pub text_scenes: usize,
    /// Single-turn colour existence questions about images (`colour_questions.json`).
    pub colour_questions: usize,
    /// Single-turn label questions about images (`label_questions.json`), a fair coin between
    /// existence ("Is there a red star in the image?", POPE's template) and main object ("Is red star
    /// the main object in this image?", RobustVQA's).
    pub label_questions: usize,
    /// Scenes written twice in `pairs_twins.jsonl`, as drawn and as their shape twin (consecutive
    /// lines): contrastive pretraining with `--group 2` then meets negatives that differ only in shape.
    pub shape_twins: usize,
    /// Evaluation scenes per split (in distribution, R, A, V).
    pub eval_per_split: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            size: 64,
            pairs: 2000,
            documents: 500,
            instructions: 10000,
            max_turns: 3,
            regions: 200,
            text_scenes: 20000,
            colour_questions: 20000,
            label_questions: 20000,
            shape_twins: 1000,
            eval_per_split: 100,
        }
    }
}

/// What was written, by file.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    pub files: BTreeMap<String, usize>,
}

struct Writer<'a> {
    out: &'a Path,
    seed: u64,
    size: u32,
    /// Next scene index per split.
    next: BTreeMap<Split, u64>,
}

impl Writer<'_> {
    /// A new scene of `split`, written to `images/<split>/<index>.png`; returns it and its path
    /// relative to the output folder.
    fn scene(&mut self, split: Split) -> Result<(Scene, String), DataError> {
        let i = self.next.entry(split).or_insert(0);
        let s = world::scene(self.seed, split, *i, self.size);
        *i += 1;
        let rel = format!("images/{}/{:06}.png", split.name(), s.index);
        let p = self.out.join(&rel);
        s.render()
            .save(&p)
            .map_err(|e| DataError::from(format!("{}: {e}", p.display())))?;
        Ok((s, rel))
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), DataError> {
    // Written whole to a temporary name, then renamed: a crash never leaves half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| DataError::from(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::from(format!("{}: {e}", path.display())))
}

/// Writes `list` as the JSON list `out/name` and counts it in `files`.
fn write_list(
    out: &Path,
    name: &str,
    list: &[serde_json::Value],
    files: &mut BTreeMap<String, usize>,
) -> Result<(), DataError> {
    write_file(
        &out.join(name),
        &serde_json::to_string(list).map_err(|e| DataError::from(e.to_string()))?,
    )?;
    files.insert(name.into(), list.len());
    Ok(())
}

/// Whether a label is in the scene, asked about object `k`: its own label or (a fair coin) an absent
/// one; for odd `k` the absent label keeps the object's colour or shape, as POPE's adversarial
/// negatives do.
pub fn label_question(s: &Scene, k: usize, rng: &mut crate::rng::Stream) -> (String, String) {
    let o = &s.objects[k];
    let exists = |label: &str| format!("Is there a {label} in the image? Please answer yes or no.");
    if rng.uniform() < 0.5 {
        return (exists(&o.label()), "Yes".to_string());
    }
    let present = |shape: usize, colour: usize| {
        s.objects
            .iter()
            .any(|o| o.shape == shape && o.colour == colour)
    };
    loop {
        let mut shape = rng.below(1, world::SHAPES.len() as u64)[0] as usize;
        let mut colour = rng.below(1, world::COLOURS.len() as u64)[0] as usize;
        if k % 2 == 1 {
            if rng.uniform() < 0.5 {
                colour = o.colour;
            } else {
                shape = o.shape;
            }
        }
        if !present(shape, colour) {
            let label = format!("{} {}", world::COLOURS[colour].0, world::SHAPES[shape]);
            return (exists(&label), "No".to_string());
        }
    }
}

/// Whether something of a colour is in the scene: a colour of one of its objects or (a fair coin) a
/// colour none of them has.
pub fn colour_question(s: &Scene, rng: &mut crate::rng::Stream) -> (String, String) {
    let ask = |c: &str| format!("Is there something {c} in the image? Please answer yes or no.");
    if rng.uniform() < 0.5 {
        let k = rng.below(1, s.objects.len() as u64)[0] as usize;
        return (ask(s.objects[k].colour_name()), "Yes".into());
    }
    let absent = absent_colours(s);
    let c = absent[rng.below(1, absent.len() as u64)[0] as usize];
    (ask(c), "No".into())
}

/// The colours no object of the scene has, in palette order (never empty: a scene has at most three
/// objects).
fn absent_colours(s: &Scene) -> Vec<&'static str> {
    world::COLOURS
        .iter()
        .enumerate()
        .filter(|&(c, _)| s.objects.iter().all(|o| o.colour != c))
        .map(|(_, (name, _))| *name)
        .collect()
}

/// The scene in words, for the text-only conversations: "The image shows a red circle with a blue
/// star."
pub fn describe(s: &Scene) -> String {
    format!("The image shows {}.", s.caption())
}

/// Instruction questions about a scene, each with its answer (the paper's VQA / hallucination prompt
/// styles): one existence yes/no per object, asking about it or (a fair coin) about an absent label
/// (every other one shares a colour or shape with the object, as POPE's adversarial negatives do);
/// colour, count, main object; and whether a label is the main object (RobustVQA style: the main
/// object or, a fair coin, another shape in its colour). Each yes/no answer is drawn on its own, so the
/// answers earlier in a conversation say nothing about the later ones.
pub fn questions(s: &Scene, rng: &mut crate::rng::Stream) -> Vec<(String, String)> {
    let main = s.main();
    let mut q: Vec<(String, String)> = (0..s.objects.len())
        .map(|k| label_question(s, k, rng))
        .collect();
    q.push((
        format!(
            "What colour is the {}? Please provide an accurate answer within one word.",
            main.shape_name()
        ),
        main.colour_name().to_string(),
    ));
    q.push((
        "How many objects are in the image? Please provide an accurate answer within one word."
            .into(),
        ["one", "two", "three"][s.objects.len() - 1].to_string(),
    ));
    q.push((
        "What is the main object in this image?".into(),
        format!("A {}.", main.label()),
    ));
    q.push(main_object_question(s, rng));
    q
}

/// Whether a label is the scene's main object (RobustVQA style): its own label (yes) or (a fair coin)
/// another shape in its colour (no), the negative only shape tells apart.
pub fn main_object_question(s: &Scene, rng: &mut crate::rng::Stream) -> (String, String) {
    let main = s.main();
    let other = loop {
        let shape = rng.below(1, world::SHAPES.len() as u64)[0] as usize;
        if shape != main.shape {
            break format!("{} {}", main.colour_name(), world::SHAPES[shape]);
        }
    };
    let (label, answer) = if rng.uniform() < 0.5 {
        (main.label(), "Yes")
    } else {
        (other, "No")
    };
    (
        format!("Is {label} the main object in this image? Please answer yes or no."),
        answer.into(),
    )
}

/// A COCO-style region annotation of `ob` (image `image_id`, `size` px): its mask (a polygon for squares
/// and diamonds, uncompressed RLE otherwise, so both encodings are exercised), area, box, shape category
/// and caption "the {label}".
fn region_annotation(
    ob: &world::Object,
    id: usize,
    image_id: usize,
    size: u32,
) -> serde_json::Value {
    let seg = match ob.shape {
        0 | 3 => {
            let (c, r) = (ob.r * if ob.shape == 0 { 0.85 } else { 1.0 }, ob.r);
            let (x, y) = (ob.cx, ob.cy);
            let pts = if ob.shape == 0 {
                vec![x - c, y - c, x + c, y - c, x + c, y + c, x - c, y + c]
            } else {
                vec![x, y - r, x + r, y, x, y + r, x - r, y]
            };
            json!([pts])
        }
        _ => json!({"size": [size, size], "counts": world::rle_counts(&ob.mask(size), size, size)}),
    };
    let area = ob.mask(size).iter().filter(|&&b| b).count();
    json!({
        "id": id, "image_id": image_id, "category_id": ob.shape,
        "segmentation": seg, "area": area, "iscrowd": 0,
        "bbox": [ob.cx - ob.r, ob.cy - ob.r, 2.0 * ob.r, 2.0 * ob.r],
        "caption": format!("the {}", ob.label()),
    })
}

/// Evaluation scene `index` of `split` for synth seed `seed` (a stream apart from the training scenes).
pub fn eval_scene(seed: u64, split: Split, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0xe7a1, split, index, size)
}

/// Scene `index` of `pairs_twins.jsonl` for synth seed `seed` (its line 2·index; its shape twin follows).
pub fn twin_scene(seed: u64, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0x7317, Split::Id, index, size)
}

/// Scene `index` of the stream `deem pretrain encoder --scenes` draws for synth seed `seed`: apart from
/// every scene `synthesize` writes, the evaluation scenes included.
pub fn pretrain_scene(seed: u64, index: u64, size: u32) -> world::Scene {
    world::scene(seed ^ 0x9c1f, Split::Id, index, size)
}

/// The region files' categories: the shapes.
fn shape_categories() -> Vec<serde_json::Value> {
    world::SHAPES
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"id": i, "name": n}))
        .collect()
}

/// Writes the synthetic world under `out` in the real formats (see the module documentation), plus
/// evaluation scenes: `eval/<split>/<colour>_<shape>/<index>.png` (ImageNet-style class folders),
/// `eval/<split>/instances.json` (COCO-style instances, for the POPE builder) and
/// `eval/regions_<split>.json` (region data on the same scenes, every object with its mask and caption:
/// held-out region-level captioning).
pub fn synthesize(out: &Path, o: &SynthOptions) -> Result<SynthSummary, DataError> {
    for split in Split::ALL {
        let d = out.join("images").join(split.name());
        std::fs::create_dir_all(&d)
            .map_err(|e| DataError::from(format!("{}: {e}", d.display())))?;
    }
    let mut s = Synth {
        out,
        o,
        w: Writer {
            out,
            seed: o.seed,
            size: o.size,
            next: BTreeMap::new(),
        },
        files: BTreeMap::new(),
        rng: crate::rng::Stream::new(o.seed, 0, 0xd0c5, crate::rng::Purpose::Data),
    };
    // In this order: the files share one random stream (twins and label questions have their own).
    s.pairs()?;
    s.documents()?;
    s.instructions()?;
    s.regions()?;
    s.text_and_colour_questions()?;
    for split in Split::ALL {
        s.eval_split(split)?;
    }
    s.twins()?;
    s.label_questions()?;
    let files = s.files;
    write_file(
        &out.join("SYNTH.json"),
        &json!({"seed": o.seed, "size": o.size, "files": files}).to_string(),
    )?;
    Ok(SynthSummary { files })
}

/// A single-turn conversation (LLaVA's format), about an image when one is given.
fn single_turn(image: Option<&str>, q: String, a: String) -> serde_json::Value {
    let mut v = json!({"conversations": [
        {"from": "human", "value": if image.is_some() { format!("<image>\n{q}") } else { q }},
        {"from": "gpt", "value": a},
    ]});
    if let Some(rel) = image {
        v["image"] = json!(rel);
    }
    v
}

/// `synthesize`'s state: where it writes, the scenes' writer, the files so far and the shared stream.
struct Synth<'a> {
    out: &'a Path,
    o: &'a SynthOptions,
    w: Writer<'a>,
    files: BTreeMap<String, usize>,
    rng: crate::rng::Stream,
}

/// Appends a file member `name` holding `data` to a tar shard (as webdataset's writers do).
pub fn append_member<W: std::io::Write>(
    tb: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tb.append_data(&mut h, name, data)
}

impl Synth<'_> {
    /// Pairs: JSONL and a webdataset tar shard with the same records.
    fn pairs(&mut self) -> Result<(), DataError> {
        // Pairs: JSONL and a webdataset tar shard with the same records.
        let mut jsonl = String::new();
        let tar_path = self.out.join("pairs-000000.tar");
        let tar_tmp = tar_path.with_extension("tmp");
        {
            let f = std::fs::File::create(&tar_tmp)
                .map_err(|e| DataError::from(format!("{}: {e}", tar_tmp.display())))?;
            let mut tb = tar::Builder::new(f);
            for _ in 0..self.o.pairs {
                let (s, rel) = self.w.scene(Split::Id)?;
                let cap = s.caption();
                jsonl.push_str(&json!({"image": rel, "caption": cap}).to_string());
                jsonl.push('\n');
                let key = format!("{:06}", s.index);
                let png = std::fs::read(self.out.join(&rel))
                    .map_err(|e| DataError::from(e.to_string()))?;
                for (name, data) in [
                    (format!("{key}.png"), png),
                    (format!("{key}.txt"), cap.into_bytes()),
                ] {
                    append_member(&mut tb, &name, &data)
                        .map_err(|e| DataError::from(format!("{}: {e}", tar_tmp.display())))?;
                }
            }
            tb.into_inner()
                .and_then(|mut f| f.flush())
                .map_err(|e| DataError::from(format!("{}: {e}", tar_tmp.display())))?;
        }
        std::fs::rename(&tar_tmp, &tar_path)
            .map_err(|e| DataError::from(format!("{}: {e}", tar_path.display())))?;
        write_file(&self.out.join("pairs.jsonl"), &jsonl)?;
        self.files.insert("pairs.jsonl".into(), self.o.pairs);
        self.files.insert("pairs-000000.tar".into(), self.o.pairs);
        Ok(())
    }

    /// Interleaved documents: 2–4 images, a sentence about each, and filler sentences between.
    fn documents(&mut self) -> Result<(), DataError> {
        // Interleaved documents: 2–4 images, a sentence about each, and filler sentences between.
        let fillers = [
            "Here is another picture.",
            "The next one is different.",
            "Look at this one.",
            "This photo was taken later.",
        ];
        let mut mmc4 = String::new();
        for _ in 0..self.o.documents {
            let n = 2 + self.rng.below(1, 3)[0] as usize;
            let mut text_list = Vec::new();
            let mut image_info = Vec::new();
            for _ in 0..n {
                let (s, rel) = self.w.scene(Split::Id)?;
                if self.rng.uniform() < 0.5 {
                    text_list.push(
                        fillers[self.rng.below(1, fillers.len() as u64)[0] as usize].to_string(),
                    );
                }
                image_info.push(json!({"image_name": rel, "matched_text_index": text_list.len(), "matched_sim": 0.3}));
                text_list.push(format!("This image shows {}.", s.caption()));
            }
            mmc4.push_str(
            &json!({"url": "synthetic://deem", "text_list": text_list, "image_info": image_info})
                .to_string(),
        );
            mmc4.push('\n');
        }
        write_file(&self.out.join("mmc4.jsonl"), &mmc4)?;
        self.files.insert("mmc4.jsonl".into(), self.o.documents);
        Ok(())
    }

    /// Instructions: multi-turn LLaVA-style conversations about one image.
    fn instructions(&mut self) -> Result<(), DataError> {
        // Instructions: multi-turn conversations (as LLaVA's are) of 1 to `max_turns` questions about one
        // image, in random order; the first question's kind cycles, so every kind leads equally often.
        let mut llava = Vec::new();
        for i in 0..self.o.instructions {
            let (s, rel) = self.w.scene(Split::Id)?;
            let mut qs = questions(&s, &mut self.rng);
            let first = qs.remove(i % qs.len());
            for k in (1..qs.len()).rev() {
                qs.swap(k, self.rng.below(1, k as u64 + 1)[0] as usize);
            }
            let turns = 1 + self.rng.below(1, self.o.max_turns.max(1) as u64)[0] as usize;
            let mut conversation = Vec::new();
            for (k, (q, a)) in std::iter::once(first).chain(qs).take(turns).enumerate() {
                let q = if k == 0 { format!("<image>\n{q}") } else { q };
                conversation.push(json!({"from": "human", "value": q}));
                conversation.push(json!({"from": "gpt", "value": a}));
            }
            llava.push(json!({
                "id": format!("synth-{i:06}"),
                "image": rel,
                "conversations": conversation,
            }));
        }
        write_list(self.out, "llava.json", &llava, &mut self.files)?;
        Ok(())
    }

    /// Regions: every object's mask with its label, COCO-style.
    fn regions(&mut self) -> Result<(), DataError> {
        // Regions: every object's mask (RLE; polygons for squares and diamonds) with its label.
        let mut images = Vec::new();
        let mut anns = Vec::new();
        for k in 0..self.o.regions {
            let (s, rel) = self.w.scene(Split::Id)?;
            images.push(
                json!({"id": k, "file_name": rel, "width": self.o.size, "height": self.o.size}),
            );
            for ob in &s.objects {
                anns.push(region_annotation(ob, anns.len(), k, self.o.size));
            }
        }
        write_file(
            &self.out.join("regions.json"),
            &json!({"images": images, "annotations": anns, "categories": shape_categories()})
                .to_string(),
        )?;
        self.files.insert("regions.json".into(), self.o.regions);
        Ok(())
    }

    /// The tiny LLM's pretraining text and stage II's colour questions.
    fn text_and_colour_questions(&mut self) -> Result<(), DataError> {
        // The tiny LLM's pretraining text, the yes/no comparison in words (text-only conversations; a fair
        // coin between a colour and a label question), and stage II's colour questions about images.
        let mut text = Vec::new();
        for i in 0..self.o.text_scenes {
            // Scenes only described, never drawn: the same distribution, from a stream of their own.
            let s = world::scene(self.o.seed ^ 0x7e47, Split::Id, i as u64, self.o.size);
            let (q, a) = if self.rng.uniform() < 0.5 {
                colour_question(&s, &mut self.rng)
            } else {
                let k = self.rng.below(1, s.objects.len() as u64)[0] as usize;
                label_question(&s, k, &mut self.rng)
            };
            let mut v = single_turn(None, format!("{} {q}", describe(&s)), a);
            v["id"] = json!(format!("text-{i:06}"));
            text.push(v);
        }
        write_list(self.out, "text_scenes.json", &text, &mut self.files)?;
        let mut colour = Vec::new();
        for i in 0..self.o.colour_questions {
            let (s, rel) = self.w.scene(Split::Id)?;
            let (q, a) = colour_question(&s, &mut self.rng);
            let mut v = single_turn(Some(&rel), q, a);
            v["id"] = json!(format!("colour-{i:06}"));
            colour.push(v);
        }
        write_list(self.out, "colour_questions.json", &colour, &mut self.files)?;
        Ok(())
    }

    /// Evaluation scenes of one split.
    fn eval_split(&mut self, split: Split) -> Result<(), DataError> {
        // Evaluation scenes: ImageNet-style class folders (class = the main object's label) and COCO-style
        // instances (category = colour + shape) per split; and per split, POPE-format colour questions about
        // them (`eval/colour_<split>.jsonl`), stage II's questions held out.
        let base = self.out.join("eval").join(split.name());
        std::fs::create_dir_all(&base)
            .map_err(|e| DataError::from(format!("{}: {e}", base.display())))?;
        let mut images = Vec::new();
        let mut anns = Vec::new();
        let mut region_images = Vec::new();
        let mut regions = Vec::new();
        let mut colour_qs = String::new();
        for k in 0..self.o.eval_per_split {
            let s = eval_scene(self.o.seed, split, k as u64, self.o.size);
            let class = s.main().label().replace(' ', "_");
            let rel = format!("{class}/{k:06}.png");
            // A colour of the scene (yes) and a colour it lacks (no), POPE-style balanced.
            let present: Vec<&str> = s.objects.iter().map(|ob| ob.colour_name()).collect();
            let absent = absent_colours(&s);
            for (c, label) in [
                (
                    present[self.rng.below(1, present.len() as u64)[0] as usize],
                    "yes",
                ),
                (
                    absent[self.rng.below(1, absent.len() as u64)[0] as usize],
                    "no",
                ),
            ] {
                let text = format!("Is there something {c} in the image? Please answer yes or no.");
                colour_qs.push_str(&json!({"image": format!("{}/{rel}", split.name()), "text": text, "label": label}).to_string());
                colour_qs.push('\n');
            }
            let p = base.join(&rel);
            std::fs::create_dir_all(p.parent().expect("has a parent"))
                .map_err(|e| DataError::from(e.to_string()))?;
            s.render()
                .save(&p)
                .map_err(|e| DataError::from(format!("{}: {e}", p.display())))?;
            images.push(
                json!({"id": k, "file_name": rel, "width": self.o.size, "height": self.o.size}),
            );
            region_images.push(json!({"id": k, "file_name": format!("{}/{rel}", split.name()), "width": self.o.size, "height": self.o.size}));
            for ob in &s.objects {
                regions.push(region_annotation(ob, regions.len(), k, self.o.size));
                anns.push(json!({
                    "id": anns.len(), "image_id": k,
                    "category_id": ob.colour * world::SHAPES.len() + ob.shape,
                    "bbox": [ob.cx - ob.r, ob.cy - ob.r, 2.0 * ob.r, 2.0 * ob.r], "iscrowd": 0,
                }));
            }
        }
        let categories: Vec<_> = world::COLOURS
            .iter()
            .flat_map(|(c, _)| world::SHAPES.iter().map(move |sh| format!("{c} {sh}")))
            .enumerate()
            .map(|(i, n)| json!({"id": i, "name": n}))
            .collect();
        write_file(
            &base.join("instances.json"),
            &json!({"images": images, "annotations": anns, "categories": categories}).to_string(),
        )?;
        self.files
            .insert(format!("eval/{}", split.name()), self.o.eval_per_split);
        let f = format!("eval/colour_{}.jsonl", split.name());
        write_file(&self.out.join(&f), &colour_qs)?;
        self.files.insert(f, 2 * self.o.eval_per_split);
        let f = format!("eval/regions_{}.json", split.name());
        self.files.insert(f.clone(), regions.len());
        write_file(
        &self.out.join(f),
        &json!({"images": region_images, "annotations": regions, "categories": shape_categories()})
            .to_string(),
    )?;
        Ok(())
    }

    /// Shape twins.
    fn twins(&mut self) -> Result<(), DataError> {
        // Shape twins, from a stream of their own (the files above do not move).
        let mut twins = String::new();
        let dir = self.out.join("images").join("twins");
        std::fs::create_dir_all(&dir)
            .map_err(|e| DataError::from(format!("{}: {e}", dir.display())))?;
        for k in 0..self.o.shape_twins {
            let s = twin_scene(self.o.seed, k as u64, self.o.size);
            for (scene, tag) in [(s.shape_twin(), "b"), (s, "a")].into_iter().rev() {
                let rel = format!("images/twins/{k:06}{tag}.png");
                scene
                    .render()
                    .save(self.out.join(&rel))
                    .map_err(|e| DataError::from(format!("{rel}: {e}")))?;
                twins.push_str(&json!({"image": rel, "caption": scene.caption()}).to_string());
                twins.push('\n');
            }
        }
        write_file(&self.out.join("pairs_twins.jsonl"), &twins)?;
        self.files
            .insert("pairs_twins.jsonl".into(), 2 * self.o.shape_twins);
        Ok(())
    }

    /// Label questions.
    fn label_questions(&mut self) -> Result<(), DataError> {
        // Label questions, from a stream of their own and on new training scenes (the files above do not
        // move).
        let mut rng = crate::rng::Stream::new(self.o.seed, 0, 0x1abe, crate::rng::Purpose::Data);
        let mut labels = Vec::new();
        for i in 0..self.o.label_questions {
            let (s, rel) = self.w.scene(Split::Id)?;
            let (q, a) = if rng.uniform() < 0.5 {
                let k = rng.below(1, s.objects.len() as u64)[0] as usize;
                label_question(&s, k, &mut rng)
            } else {
                main_object_question(&s, &mut rng)
            };
            let mut v = single_turn(Some(&rel), q, a);
            v["id"] = json!(format!("label-{i:06}"));
            labels.push(v);
        }
        write_list(self.out, "label_questions.json", &labels, &mut self.files)?;
        Ok(())
    }
}
