//! How each kind of record becomes a sample's segments (the templates of the mixer's module notes),
//! one record at a time, for records held in memory and records streamed from disk alike: the caller
//! says where each image's pixels are.

use super::{ImageRef, Segment, MAX_IMAGES_PER_DOCUMENT};
use crate::data::DataError;
use crate::text::tokenizer::DeemTokenizer;

/// What the templates need of the configuration.
#[derive(Clone, Copy)]
pub(super) struct Template {
    pub eos: i64,
    /// `train.loss_on_prompts`: conversations' prompts are targets too.
    pub loss_on_prompts: bool,
}

pub(super) fn text(tok: &DeemTokenizer, s: &str) -> Result<Vec<i64>, DataError> {
    tok.encode(s, false)
        .map(|v| v.into_iter().map(i64::from).collect())
        .map_err(DataError::from)
}

impl Template {
    /// Which ids of a prompt are NTP targets: `Some(0)` all (`train.loss_on_prompts`), else none.
    fn prompt_targets(&self) -> Option<usize> {
        if self.loss_on_prompts {
            Some(0)
        } else {
            Some(usize::MAX)
        }
    }

    /// A fixed-place prompt segment (no targets unless `train.loss_on_prompts`).
    pub fn prompt(&self, text: Vec<i64>, images: Vec<ImageRef>) -> Segment {
        Segment {
            text,
            images,
            movable: false,
            targets_from: self.prompt_targets(),
        }
    }

    /// An image-text pair: the image before or after its caption.
    pub fn pair(
        &self,
        tok: &DeemTokenizer,
        caption: &str,
        image: ImageRef,
    ) -> Result<Vec<Segment>, DataError> {
        Ok(vec![Segment {
            text: text(tok, &format!(" {caption}"))?,
            images: vec![image],
            movable: true,
            targets_from: None,
        }])
    }

    /// An interleaved document: each image before or after its matched sentence, at most 6 images
    /// (`image` places each one kept, in order).
    pub fn document<I>(
        &self,
        tok: &DeemTokenizer,
        texts: &[String],
        images: &[(I, usize)],
        mut image: impl FnMut(&I) -> ImageRef,
    ) -> Result<Vec<Segment>, DataError> {
        let mut segs = Vec::new();
        let mut used = 0;
        for (i, t) in texts.iter().enumerate() {
            let mut refs = Vec::new();
            for (img, at) in images {
                if *at == i && used < MAX_IMAGES_PER_DOCUMENT {
                    refs.push(image(img));
                    used += 1;
                }
            }
            segs.push(Segment {
                text: text(tok, &format!(" {t}"))?,
                images: refs,
                movable: true,
                targets_from: None,
            });
        }
        Ok(segs)
    }

    /// A conversation in the chat template; `image` leads the first question.
    pub fn conversation(
        &self,
        tok: &DeemTokenizer,
        system: &str,
        image: Option<ImageRef>,
        turns: &[(String, String)],
    ) -> Result<Vec<Segment>, DataError> {
        let mut segs = vec![self.prompt(text(tok, system)?, vec![])];
        let mut image = image;
        for (i, (q, a)) in turns.iter().enumerate() {
            let q = q.replace("<image>", "").trim().to_string();
            segs.push(self.prompt(text(tok, " USER:")?, vec![]));
            // " {q} ASSISTANT:" is context; " {a}</s>" the target (the last reply's EOS is the
            // sample's own, appended by `emit`).
            let mut qt = text(tok, &format!(" {q}"))?;
            qt.extend(text(tok, " ASSISTANT:")?);
            let from = qt.len();
            qt.extend(text(tok, &format!(" {a}"))?);
            if i + 1 < turns.len() {
                qt.push(self.eos);
            }
            segs.push(Segment {
                text: qt,
                images: image.take().into_iter().collect(),
                movable: false,
                targets_from: Some(if self.loss_on_prompts { 0 } else { from }),
            });
        }
        Ok(segs)
    }
}
