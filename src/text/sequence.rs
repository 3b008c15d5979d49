//! Images inside the token sequence: each image is `<|startofimage|>` followed by one `<|sniffer|>`
//! placeholder per visual token; the placeholders' embeddings are replaced by the image's visual tokens
//! (in order of appearance) and the learnable SoI vector is added to every `<|startofimage|>` embedding.

use tch::{Kind, Tensor};

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SequenceError {
    #[error("the sequence has {placeholders} <|sniffer|> placeholders, but {images} image(s) × {per_image} visual tokens = {expected} were given")]
    Count {
        placeholders: i64,
        images: i64,
        per_image: i64,
        expected: i64,
    },
    #[error("visual tokens have width {found}, the LLM embeddings {expected}")]
    Width { found: i64, expected: i64 },
}

/// Splices visual tokens into token embeddings.
///
/// - `embeds` `[B, T, C]`: the LLM's embeddings of `ids` `[B, T]`;
/// - `visual` `[N, K, C]`: the visual tokens of the N images, in the order their placeholders appear
///   (row by row through the batch);
/// - `soi` `[C]`: added at every `soi_id` position.
pub fn splice_images(
    embeds: &Tensor,
    ids: &Tensor,
    visual: &Tensor,
    soi: &Tensor,
    soi_id: i64,
    sniffer_id: i64,
) -> Result<Tensor, SequenceError> {
    let c = embeds.size()[2];
    let (n, k, width) = visual.size3().unwrap_or((0, 0, c));
    if width != c {
        return Err(SequenceError::Width {
            found: width,
            expected: c,
        });
    }
    let holes = ids.eq(sniffer_id);
    let placeholders = holes.sum(Kind::Int64).int64_value(&[]);
    if placeholders != n * k {
        return Err(SequenceError::Count {
            placeholders,
            images: n,
            per_image: k,
            expected: n * k,
        });
    }
    let mask = holes.unsqueeze(-1).expand_as(embeds);
    let out = embeds.masked_scatter(&mask, &visual.to_kind(embeds.kind()));
    let is_soi = ids.eq(soi_id).unsqueeze(-1).to_kind(embeds.kind());
    Ok(out + is_soi * soi.to_kind(embeds.kind()))
}
