//! Image decoding with its allocation bounded, after the `image` crate's `Limits`: an image is decoded
//! only when its header's size is within [`MAX_IMAGE_PIXELS`] and plausible for its file's size (none
//! of PNG, JPEG, WebP or GIF expands a file byte into more than [`MAX_EXPANSION`] decoded bytes), and
//! the decoder may allocate no more than that size needs. A small file declaring a huge image is
//! refused before anything is allocated for it, naming both sizes.

use std::io::Cursor;

use image::{ImageReader, RgbImage};

use super::DataError;

/// The most pixels a dataset or request image may have (8192 × 8192).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// Decoded RGB bytes per file byte no real image exceeds: deflate (PNG) stops near 1032:1, LZW (GIF)
/// near 2700:1 in indices; a solid 4096 × 4096 image needs a file of at least 6 KiB.
pub const MAX_EXPANSION: u64 = 8192;

/// Headroom for tiny files (a 1 × 1 PNG is larger than its pixels).
const SLACK_BYTES: u64 = 1 << 20;

/// An error unless a `w × h` image is within [`MAX_IMAGE_PIXELS`] and its RGB size plausible for a
/// file of `len` bytes.
pub fn check_size(w: u32, h: u32, len: usize) -> Result<(), DataError> {
    let pixels = w as u64 * h as u64;
    if pixels == 0 || pixels > MAX_IMAGE_PIXELS {
        return Err(DataError::from(format!(
            "the image is {w}×{h}; expected 1 to {MAX_IMAGE_PIXELS} pixels (8192 × 8192)"
        )));
    }
    if pixels * 3 > MAX_EXPANSION * len as u64 + SLACK_BYTES {
        return Err(DataError::from(format!(
            "the image declares {w}×{h} pixels but its file holds only {len} bytes: no PNG, JPEG, WebP or GIF compresses so far"
        )));
    }
    Ok(())
}

/// The width and height in an image file's header, read without decoding it.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), DataError> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::from(format!("cannot read the image: {e}")))?
        .into_dimensions()
        .map_err(undecodable)
}

/// Decodes an image file (PNG, JPEG, WebP, GIF) to RGB, its size checked first ([`check_size`]) and
/// the decoder's allocations limited to what that size needs.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, DataError> {
    let (w, h) = dimensions(bytes)?;
    check_size(w, h, bytes.len())?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::from(format!("cannot read the image: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA at 16 bits a channel, twice (a decoder's buffer and its output), and some headroom.
    limits.max_alloc = Some(w as u64 * h as u64 * 16 + SLACK_BYTES);
    reader.limits(limits);
    Ok(reader.decode().map_err(undecodable)?.to_rgb8())
}

fn undecodable(e: image::ImageError) -> DataError {
    DataError::from(format!(
        "cannot decode the image (PNG, JPEG, WebP or GIF expected): {e}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    /// `png` with its header (IHDR) claiming `w × h`, its checksum kept valid.
    fn claiming(png: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut out = png.to_vec();
        out[16..20].copy_from_slice(&w.to_be_bytes());
        out[20..24].copy_from_slice(&h.to_be_bytes());
        // CRC-32 (IEEE) over the chunk's type and data.
        let mut crc = !0u32;
        for &b in &out[12..29] {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        out[29..33].copy_from_slice(&(!crc).to_be_bytes());
        out
    }

    #[test]
    fn images_decode_and_impossible_sizes_are_refused_before_decoding() {
        let good = png(40, 30);
        let img = decode_rgb(&good).unwrap();
        assert_eq!(img.dimensions(), (40, 30));
        assert_eq!(img.get_pixel(3, 2).0, [3, 2, 7]);
        // The same file with its header claiming 20000 × 20000: refused on the sizes alone.
        assert_eq!(
            decode_rgb(&claiming(&good, 20000, 20000))
                .unwrap_err()
                .to_string(),
            "the image is 20000×20000; expected 1 to 67108864 pixels (8192 × 8192)"
        );
        assert_eq!(
            decode_rgb(&claiming(&good, 8000, 8000))
                .unwrap_err()
                .to_string(),
            format!("the image declares 8000×8000 pixels but its file holds only {} bytes: no PNG, JPEG, WebP or GIF compresses so far", good.len())
        );
        assert!(decode_rgb(b"not an image")
            .unwrap_err()
            .to_string()
            .starts_with("cannot decode the image (PNG, JPEG, WebP or GIF expected): "));
    }
}
