//! The embedded synthetic world: deterministic scenes of 1–3 objects (9 shapes × 10 colours, with
//! sizes, positions and per-object masks), rendered in distribution and in three out-of-distribution
//! styles in the spirit of ImageNet-R / -A / -V2:
//!
//! - **R** (renditions): outlines, sketch strokes, textured (striped) fills;
//! - **A** (hard cases): cluttered or noisy backgrounds, distractor patterns, a small main object;
//! - **V** (shifted distribution): other sizes and positions (near the borders), a shifted palette.
//!
//! The main object is the largest one and is drawn last, so it is always visible. Every draw comes from
//! a SplitMix stream keyed by (seed, scene index, split), so a scene is the same on every machine.

use image::{Rgb, RgbImage};

use crate::data::DataError;
use crate::rng::{Purpose, Stream};

pub const SHAPES: [&str; 9] = [
    "square", "circle", "triangle", "diamond", "cross", "ring", "star", "hexagon", "bar",
];

pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 215, 40]),
    ("orange", [240, 140, 20]),
    ("purple", [140, 50, 190]),
    ("cyan", [40, 200, 210]),
    ("white", [245, 245, 245]),
    ("pink", [240, 130, 180]),
    ("brown", [130, 80, 40]),
];

/// Which distribution a scene is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    /// In distribution (training and the in-distribution evaluation).
    Id,
    /// Renditions.
    R,
    /// Hard cases.
    A,
    /// Shifted distribution.
    V,
}

impl Split {
    pub const ALL: [Split; 4] = [Split::Id, Split::R, Split::A, Split::V];

    pub fn name(self) -> &'static str {
        match self {
            Split::Id => "id",
            Split::R => "r",
            Split::A => "a",
            Split::V => "v",
        }
    }

    fn key(self) -> u64 {
        match self {
            Split::Id => 0,
            Split::R => 1,
            Split::A => 2,
            Split::V => 3,
        }
    }
}

/// One object of a scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub colour: usize,
    /// Centre and half-size, in pixels.
    pub cx: f64,
    pub cy: f64,
    pub r: f64,
}

impl Object {
    pub fn shape_name(&self) -> &'static str {
        SHAPES[self.shape]
    }

    pub fn colour_name(&self) -> &'static str {
        COLOURS[self.colour].0
    }

    /// "red circle".
    pub fn label(&self) -> String {
        format!("{} {}", self.colour_name(), self.shape_name())
    }

    /// Whether pixel centre (x, y) lies inside the shape.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = ((x - self.cx) / self.r, (y - self.cy) / self.r);
        let (ax, ay) = (dx.abs(), dy.abs());
        match self.shape {
            0 => ax <= 0.85 && ay <= 0.85,
            1 => dx * dx + dy * dy <= 1.0,
            2 => (-0.9..=0.8).contains(&dy) && ax <= (dy + 0.9) * 0.55,
            3 => ax + ay <= 1.0,
            4 => (ax <= 0.3 && ay <= 1.0) || (ay <= 0.3 && ax <= 1.0),
            5 => {
                let d = (dx * dx + dy * dy).sqrt();
                (0.55..=1.0).contains(&d)
            }
            6 => {
                let d = (dx * dx + dy * dy).sqrt();
                let a = dy.atan2(dx);
                d <= 0.45
                    + 0.55 * (0.5 + 0.5 * (5.0 * a + std::f64::consts::FRAC_PI_2).cos()).powi(2)
            }
            7 => ay <= 0.866 && ax * 0.866 + ay * 0.5 <= 0.866,
            _ => ax <= 1.0 && ay <= 0.35,
        }
    }

    /// The object's mask on a `size`² grid, row-major.
    pub fn mask(&self, size: u32) -> Vec<bool> {
        let mut m = Vec::with_capacity((size * size) as usize);
        for y in 0..size {
            for x in 0..size {
                m.push(self.contains(x as f64 + 0.5, y as f64 + 0.5));
            }
        }
        m
    }
}

/// A scene: its objects (the main one first) and how it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub split: Split,
    pub index: u64,
    pub size: u32,
    pub objects: Vec<Object>,
    /// Rendering style within the split (R: 0 outline, 1 sketch, 2 texture; A: 0 clutter, 1 noise,
    /// 2 pattern; otherwise 0).
    pub style: u8,
    seed: u64,
}

impl Scene {
    /// A scene of one object on the in-distribution background (class prototypes).
    pub fn single(object: Object, size: u32) -> Scene {
        Scene {
            split: Split::Id,
            index: 0,
            size,
            objects: vec![object],
            style: 0,
            seed: 0,
        }
    }

    /// The same scene with every object's shape changed to another one (same colours, places, sizes,
    /// background and rendering): a hard negative that only shape tells apart.
    pub fn shape_twin(&self) -> Scene {
        let mut t = self.clone();
        for (k, o) in t.objects.iter_mut().enumerate() {
            let mut s = Stream::new(self.seed, self.index, 0x7a1 + k as u64, Purpose::Data);
            let n = SHAPES.len() as u64;
            o.shape = (o.shape + 1 + s.below(1, n - 1)[0] as usize) % n as usize;
        }
        t
    }

    /// The main object (the largest; drawn last).
    pub fn main(&self) -> &Object {
        &self.objects[0]
    }

    /// "a red circle", or "a red circle with a blue star and a green bar".
    pub fn caption(&self) -> String {
        let mut c = format!("a {}", self.main().label());
        let rest: Vec<String> = self.objects[1..]
            .iter()
            .map(|o| format!("a {}", o.label()))
            .collect();
        if !rest.is_empty() {
            c.push_str(" with ");
            c.push_str(&rest.join(" and "));
        }
        c
    }

    /// Renders the scene; each object's own mask is [`Object::mask`] (occlusion ignored).
    pub fn render(&self) -> RgbImage {
        let n = self.size;
        let mut s = Stream::new(
            self.seed,
            self.index,
            0x5ce9e + self.split.key(),
            Purpose::Data,
        );
        let bg = [
            110 + (s.uniform() * 40.0) as u8,
            110 + (s.uniform() * 40.0) as u8,
            110 + (s.uniform() * 40.0) as u8,
        ];
        let mut img = RgbImage::from_pixel(n, n, Rgb(bg));
        let noise = |s: &mut Stream, amp: f64| ((s.uniform() - 0.5) * 2.0 * amp) as i32;
        let clamp = |v: i32| v.clamp(0, 255) as u8;
        // Background treatment.
        match (self.split, self.style) {
            (Split::A, 0) => {
                // Clutter: many small blobs of other colours.
                for _ in 0..14 {
                    let c = COLOURS[s.below(1, COLOURS.len() as u64)[0] as usize].1;
                    let (bx, by) = (s.uniform() * n as f64, s.uniform() * n as f64);
                    let br = 1.5 + s.uniform() * n as f64 / 16.0;
                    for y in 0..n {
                        for x in 0..n {
                            let (dx, dy) = (x as f64 - bx, y as f64 - by);
                            if dx * dx + dy * dy <= br * br {
                                img.put_pixel(x, y, Rgb(c));
                            }
                        }
                    }
                }
            }
            (Split::A, 2) => {
                // Distractor pattern: a checkerboard of two colours.
                let c1 = COLOURS[s.below(1, COLOURS.len() as u64)[0] as usize].1;
                let cell = (n / 8).max(2);
                for y in 0..n {
                    for x in 0..n {
                        if ((x / cell) + (y / cell)) % 2 == 0 {
                            img.put_pixel(x, y, Rgb(c1));
                        }
                    }
                }
            }
            _ => {}
        }
        // Objects, smallest first, the main one last.
        for o in self.objects.iter().rev() {
            let mut c = COLOURS[o.colour].1;
            if self.split == Split::V {
                // Shifted palette: the same names, other shades.
                c = [
                    clamp(c[0] as i32 - 45),
                    clamp(c[1] as i32 + 25),
                    clamp(c[2] as i32 - 20),
                ];
            }
            let m = o.mask(n);
            let inside = |x: u32, y: u32| x < n && y < n && m[(y * n + x) as usize];
            for y in 0..n {
                for x in 0..n {
                    if !inside(x, y) {
                        continue;
                    }
                    let edge = x == 0
                        || y == 0
                        || !inside(x - 1, y)
                        || !inside(x + 1, y)
                        || !inside(x, y - 1)
                        || !inside(x, y + 1);
                    let paint = match (self.split, self.style) {
                        (Split::R, 0) => edge,
                        // Sketch: the edge with gaps, plus diagonal hatching.
                        (Split::R, 1) => (edge && (x + y) % 3 != 0) || (x + y) % 5 == 0,
                        // Texture: stripes of the colour and a darker shade.
                        (Split::R, 2) => {
                            if (x / 2 + y / 2) % 2 == 0 {
                                true
                            } else {
                                img.put_pixel(x, y, Rgb([c[0] / 2, c[1] / 2, c[2] / 2]));
                                false
                            }
                        }
                        _ => true,
                    };
                    if paint {
                        img.put_pixel(x, y, Rgb(c));
                    }
                }
            }
        }
        // Pixel noise: light everywhere, heavy for A/noise.
        let amp = if (self.split, self.style) == (Split::A, 1) {
            70.0
        } else {
            6.0
        };
        for p in img.pixels_mut() {
            for ch in p.0.iter_mut() {
                *ch = clamp(*ch as i32 + noise(&mut s, amp));
            }
        }
        img
    }
}

/// The scene number `index` of `split` for `seed`, at `size` pixels.
pub fn scene(seed: u64, split: Split, index: u64, size: u32) -> Scene {
    let mut s = Stream::new(seed, index, 0x0b1ec + split.key(), Purpose::Data);
    let n = size as f64;
    let count = 1 + s.below(1, 3)[0] as usize;
    let style = match split {
        Split::R | Split::A => s.below(1, 3)[0] as u8,
        _ => 0,
    };
    let mut objects: Vec<Object> = (0..count)
        .map(|k| {
            // The main object (k = 0) is the largest; V shifts sizes and pushes objects to the borders.
            let (lo, hi) = match (split, k) {
                (Split::V, 0) => (0.12, 0.20),
                (Split::A, 0) => (0.14, 0.22),
                (_, 0) => (0.22, 0.34),
                (_, _) => (0.08, 0.14),
            };
            let r = n * (lo + (hi - lo) * s.uniform());
            let margin = if split == Split::V { r * 0.6 } else { r + 1.0 };
            let span = (n - 2.0 * margin).max(1.0);
            let (mut cx, mut cy) = (margin + s.uniform() * span, margin + s.uniform() * span);
            if split == Split::V && k == 0 {
                // Near a border.
                if s.uniform() < 0.5 {
                    cx = if s.uniform() < 0.5 {
                        margin
                    } else {
                        n - margin
                    };
                } else {
                    cy = if s.uniform() < 0.5 {
                        margin
                    } else {
                        n - margin
                    };
                }
            }
            Object {
                shape: s.below(1, SHAPES.len() as u64)[0] as usize,
                colour: s.below(1, COLOURS.len() as u64)[0] as usize,
                cx,
                cy,
                r,
            }
        })
        .collect();
    // Distinct labels within a scene, so "is there a …" questions have one answer.
    for k in 1..objects.len() {
        while objects[..k]
            .iter()
            .any(|o| o.shape == objects[k].shape && o.colour == objects[k].colour)
        {
            objects[k].colour = (objects[k].colour + 1) % COLOURS.len();
        }
    }
    Scene {
        split,
        index,
        size,
        objects,
        style,
        seed,
    }
}

/// COCO's uncompressed RLE of a row-major mask of `w`×`h`: run lengths in column-major order,
/// starting with a run of zeros.
pub fn rle_counts(mask: &[bool], w: u32, h: u32) -> Vec<u32> {
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u32;
    for x in 0..w {
        for y in 0..h {
            let v = mask[(y * w + x) as usize];
            if v != current {
                counts.push(run);
                run = 0;
                current = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`: each count in 5-bit
/// groups, least significant first, as characters from '0' with 0x20 marking "more" and 0x10 the sign of
/// the last group; from the third count on, each is stored as its difference from the count two before).
pub fn rle_from_string(s: &str) -> Result<Vec<u32>, DataError> {
    let bytes = s.as_bytes();
    let mut counts: Vec<u32> = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        let (mut x, mut k, mut more) = (0i64, 0u32, true);
        while more {
            let Some(&b) = bytes.get(p) else {
                return Err(DataError::from(format!(
                    "compressed RLE counts end inside a number (after {} counts)",
                    counts.len()
                )));
            };
            if !(48..48 + 64).contains(&b) {
                return Err(DataError::from(format!(
                    "compressed RLE counts: character {:?} at {p} is not a count digit",
                    b as char
                )));
            }
            if k > 6 {
                return Err(DataError::from(format!(
                    "compressed RLE counts: count {} runs past 7 digits at {p}, longer than any 32-bit count",
                    counts.len()
                )));
            }
            let c = (b - 48) as i64;
            x |= (c & 0x1f) << (5 * k);
            more = c & 0x20 != 0;
            p += 1;
            k += 1;
            if !more && c & 0x10 != 0 {
                x |= -1i64 << (5 * k);
            }
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        let count = u32::try_from(x).map_err(|_| {
            format!(
                "compressed RLE counts: count {} decodes to {x}, expected a run length ≥ 0",
                counts.len()
            )
        })?;
        counts.push(count);
    }
    Ok(counts)
}

/// COCO's compressed RLE string of run lengths (pycocotools' `rleToString`; the inverse of
/// [`rle_from_string`]).
pub fn rle_to_string(counts: &[u32]) -> String {
    let mut s = String::new();
    for (i, &c) in counts.iter().enumerate() {
        let mut x = c as i64 - if i > 2 { counts[i - 2] as i64 } else { 0 };
        loop {
            let mut digit = (x & 0x1f) as u8;
            x >>= 5;
            let more = if digit & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                digit |= 0x20;
            }
            s.push((digit + 48) as char);
            if !more {
                break;
            }
        }
    }
    s
}

/// The most pixels a region mask may have, an image's own bound (8192 × 8192): a file declaring a
/// larger image is refused before any mask is allocated.
pub const MAX_MASK_PIXELS: u64 = super::decode::MAX_IMAGE_PIXELS;

/// An error unless a `w × h` mask is within [`MAX_MASK_PIXELS`].
pub fn check_mask_size(w: u32, h: u32) -> Result<(), DataError> {
    let n = w as u64 * h as u64;
    if n > MAX_MASK_PIXELS {
        return Err(DataError::from(format!(
            "a {w}×{h} mask has {n} pixels, above the {MAX_MASK_PIXELS} deem allows (8192 × 8192)"
        )));
    }
    Ok(())
}

/// The row-major mask of COCO uncompressed RLE counts.
pub fn rle_decode(counts: &[u32], w: u32, h: u32) -> Result<Vec<bool>, DataError> {
    check_mask_size(w, h)?;
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    if total != (w as u64) * (h as u64) {
        return Err(DataError::from(format!(
            "RLE counts sum to {total}, expected width × height = {}",
            w as u64 * h as u64
        )));
    }
    let mut m = vec![false; w as usize * h as usize];
    let mut i = 0u64;
    let mut v = false;
    for &c in counts {
        for _ in 0..c {
            let (x, y) = ((i / h as u64) as u32, (i % h as u64) as u32);
            m[(y * w + x) as usize] = v;
            i += 1;
        }
        v = !v;
    }
    Ok(m)
}

/// The row-major mask of a polygon (COCO `[x1, y1, x2, y2, …]`), by pixel-centre even-odd test.
pub fn polygon_mask(poly: &[f64], w: u32, h: u32) -> Vec<bool> {
    let pts: Vec<(f64, f64)> = poly.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let mut m = vec![false; w as usize * h as usize];
    for y in 0..h {
        for x in 0..w {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let mut inside = false;
            let mut j = pts.len().wrapping_sub(1);
            for i in 0..pts.len() {
                let (xi, yi) = pts[i];
                let (xj, yj) = pts[j];
                if (yi > py) != (yj > py) && px < (xj - xi) * (py - yi) / (yj - yi) + xi {
                    inside = !inside;
                }
                j = i;
            }
            m[(y * w + x) as usize] = inside;
        }
    }
    m
}
