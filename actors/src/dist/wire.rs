//! Framed tensor messages over c10d point-to-point, after PyTorch's pipelining P2P (a metadata message,
//! then the tensors): a fixed-size header frame — a little-endian length, then a `bincode` 2 encoding
//! of [`Header`] (edge, microbatch or request id, shape and dtype of every tensor, trace context) — and
//! then each tensor's bytes, received straight into a tensor of that shape and dtype.

use bincode::{Decode, Encode};
use tch::{Device, Kind, Tensor};

use super::c10d::{Backend, Group, Pending};
use super::DistError;

type Result<T, E = DistError> = std::result::Result<T, E>;

/// Bytes of the header frame (length prefix included).
pub const HEADER_BYTES: usize = 4096;

/// Shape and dtype of one tensor of a message.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Meta {
    pub shape: Vec<i64>,
    pub kind: u8,
}

/// What precedes a message's tensors.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Header {
    /// The edge's name (checked by the receiver).
    pub edge: String,
    /// The microbatch (training) or request sequence (serving).
    pub seq: u64,
    /// The microbatch's or request's id.
    pub id: [u8; 16],
    /// `None`: the message carries nothing for this edge.
    pub tensors: Option<Vec<Meta>>,
    /// Row indices riding with the tensors (the images a NIP context draws).
    pub index: Vec<i64>,
    /// The sender's trace context (`step/microbatch/id`).
    pub trace: String,
}

const KINDS: [Kind; 10] = [
    Kind::Float,
    Kind::Double,
    Kind::Half,
    Kind::BFloat16,
    Kind::Int64,
    Kind::Int,
    Kind::Int16,
    Kind::Int8,
    Kind::Uint8,
    Kind::Bool,
];

fn kind_code(k: Kind) -> Option<u8> {
    KINDS.iter().position(|x| *x == k).map(|i| i as u8)
}

/// bincode's standard encoding, limited to the frame: a length claimed inside a garbage or hostile
/// header (a string, a list) fails to decode instead of allocating that much.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HEADER_BYTES>()
}

fn header_error(problem: String) -> DistError {
    DistError::Header { problem }
}

/// Encodes `h` into a header frame.
pub fn encode(h: &Header) -> Result<Vec<u8>> {
    let body = bincode::encode_to_vec(h, config()).map_err(|e| header_error(e.to_string()))?;
    if body.len() + 4 > HEADER_BYTES {
        return Err(header_error(format!(
            "header of {} bytes exceeds the {HEADER_BYTES}-byte frame",
            body.len() + 4
        )));
    }
    let mut frame = vec![0u8; HEADER_BYTES];
    frame[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    frame[4..4 + body.len()].copy_from_slice(&body);
    Ok(frame)
}

/// Decodes a header frame.
pub fn decode(frame: &[u8]) -> Result<Header> {
    if frame.len() < 4 {
        return Err(header_error(format!(
            "a frame of {} bytes has no length",
            frame.len()
        )));
    }
    let n = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if n + 4 > frame.len() {
        return Err(header_error(format!(
            "length {n} runs past the {}-byte frame",
            frame.len()
        )));
    }
    let (h, used): (Header, usize) = bincode::decode_from_slice(&frame[4..4 + n], config())
        .map_err(|e| header_error(e.to_string()))?;
    if used != n {
        return Err(header_error(format!(
            "{} trailing bytes after the header",
            n - used
        )));
    }
    for m in h.tensors.iter().flatten() {
        if m.kind as usize >= KINDS.len() {
            return Err(header_error(format!("unknown dtype code {}", m.kind)));
        }
        if m.shape.iter().any(|&d| d < 0) {
            return Err(header_error(format!(
                "negative dimension in shape {:?}",
                m.shape
            )));
        }
    }
    Ok(h)
}

/// The device a group's tensors must sit on for its backend.
fn wire_device(g: &Group, like: &Tensor) -> Device {
    match g.backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => like.device(),
    }
}

/// Starts sending a message (`header.tensors` is filled in from `tensors`) to `dst` under `tag`; the
/// pending sends keep the tensors alive until waited.
pub fn send(
    g: &Group,
    dst: i64,
    tag: i32,
    mut header: Header,
    tensors: Option<&[Tensor]>,
) -> Result<Vec<Pending>> {
    let frame_err = |problem: String| DistError::Frame {
        rank: g.world_rank,
        peer: dst,
        edge: header.edge.clone(),
        problem,
    };
    let mut payload = Vec::new();
    let mut metas = Vec::new();
    for t in tensors.into_iter().flatten() {
        let kind = kind_code(t.kind())
            .ok_or_else(|| frame_err(format!("cannot send dtype {:?}", t.kind())))?;
        metas.push(Meta {
            shape: t.size(),
            kind,
        });
        payload.push(t.to_device(wire_device(g, t)).contiguous());
    }
    header.tensors = tensors.map(|_| metas);
    let frame = encode(&header).map_err(|e| frame_err(e.to_string()))?;
    let frame = Tensor::from_slice(&frame);
    let mut pending = vec![g.isend(&frame, dst, tag)?];
    for t in &payload {
        if t.numel() > 0 {
            pending.push(g.isend(t, dst, tag)?);
        }
    }
    Ok(pending)
}

/// Receives a message from `src` under `tag`, expecting `edge`; tensors arrive on the CPU (Gloo) or
/// `device` (NCCL).
pub fn recv(
    g: &Group,
    src: i64,
    tag: i32,
    edge: &str,
    device: Device,
) -> Result<(Header, Option<Vec<Tensor>>)> {
    let frame = Tensor::zeros([HEADER_BYTES as i64], (Kind::Uint8, Device::Cpu));
    g.recv(&frame, src, tag)?;
    let bytes: Vec<u8> = Vec::<u8>::try_from(&frame).map_err(|e| DistError::Frame {
        rank: g.world_rank,
        peer: src,
        edge: edge.into(),
        problem: e.to_string(),
    })?;
    let h = decode(&bytes).map_err(|e| DistError::Frame {
        rank: g.world_rank,
        peer: src,
        edge: edge.into(),
        problem: match e {
            DistError::Header { problem } => problem,
            other => other.to_string(),
        },
    })?;
    if h.edge != edge {
        return Err(DistError::Frame {
            rank: g.world_rank,
            peer: src,
            edge: edge.into(),
            problem: format!("expected a message on {edge}, got one on {}", h.edge),
        });
    }
    let dev = match g.backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => device,
    };
    let tensors = match &h.tensors {
        None => None,
        Some(metas) => {
            let mut out = Vec::with_capacity(metas.len());
            for m in metas {
                let t = Tensor::empty(m.shape.as_slice(), (KINDS[m.kind as usize], dev));
                if t.numel() > 0 {
                    g.recv(&t, src, tag)?;
                }
                out.push(t);
            }
            Some(out)
        }
    };
    Ok((h, tensors))
}
