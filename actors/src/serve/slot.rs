//! Tensors inside serialized messages, after serde's `with` modules: each tensor field becomes an index
//! into the message's tensor list (`#[serde(with = "slot::one")]` and friends), filled while encoding
//! and read while decoding ([`super::remote::encode`], [`super::remote::decode`]).

use std::cell::RefCell;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::Tensor;

use crate::serve::error::InferError;

thread_local! {
    pub(crate) static OUT: RefCell<Vec<Tensor>> = const { RefCell::new(Vec::new()) };
    pub(crate) static IN: RefCell<Vec<Option<Tensor>>> = const { RefCell::new(Vec::new()) };
}

fn put(t: &Tensor) -> u32 {
    OUT.with(|o| {
        let mut o = o.borrow_mut();
        o.push(t.shallow_clone());
        (o.len() - 1) as u32
    })
}

fn take<E: serde::de::Error>(i: u32) -> Result<Tensor, E> {
    IN.with(|v| v.borrow_mut().get_mut(i as usize).and_then(Option::take))
        .ok_or_else(|| E::custom(format!("tensor slot {i} is missing or used twice")))
}

pub mod one {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Tensor, s: S) -> Result<S::Ok, S::Error> {
        put(t).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tensor, D::Error> {
        take(u32::deserialize(d)?)
    }
}

pub mod opt {
    use super::*;
    pub fn serialize<S: Serializer>(t: &Option<Tensor>, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref().map(put).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tensor>, D::Error> {
        Option::<u32>::deserialize(d)?.map(take).transpose()
    }
}

pub mod batch {
    use super::*;
    type T = Option<(Vec<usize>, Tensor)>;
    pub fn serialize<S: Serializer>(t: &T, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref().map(|(r, x)| (r, put(x))).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        Option::<(Vec<usize>, u32)>::deserialize(d)?
            .map(|(r, i)| take(i).map(|x| (r, x)))
            .transpose()
    }
}

pub mod rows {
    use super::*;
    type T = Vec<(usize, Tensor)>;
    pub fn serialize<S: Serializer>(t: &T, s: S) -> Result<S::Ok, S::Error> {
        t.iter()
            .map(|(r, x)| (*r, put(x)))
            .collect::<Vec<_>>()
            .serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        Vec::<(usize, u32)>::deserialize(d)?
            .into_iter()
            .map(|(r, i)| take(i).map(|x| (r, x)))
            .collect()
    }
}

pub mod pair {
    use super::*;
    type T = Result<(Tensor, Tensor), InferError>;
    pub fn serialize<S: Serializer>(t: &T, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref()
            .map(|(a, b)| (put(a), put(b)))
            .map_err(Clone::clone)
            .serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        match Result::<(u32, u32), InferError>::deserialize(d)? {
            Ok((a, b)) => Ok(Ok((take(a)?, take(b)?))),
            Err(e) => Ok(Err(e)),
        }
    }
}

pub mod image {
    use super::*;
    type T = Result<(Tensor, Vec<u8>), InferError>;
    pub fn serialize<S: Serializer>(t: &T, s: S) -> Result<S::Ok, S::Error> {
        t.as_ref()
            .map(|(a, png)| (put(a), png))
            .map_err(Clone::clone)
            .serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        match Result::<(u32, Vec<u8>), InferError>::deserialize(d)? {
            Ok((a, png)) => Ok(Ok((take(a)?, png))),
            Err(e) => Ok(Err(e)),
        }
    }
}

/// Unused slots after decoding are an error too (a message that names fewer tensors than it
/// carried).
pub(crate) fn untaken() -> usize {
    IN.with(|v| {
        let left = v.borrow().iter().filter(|t| t.is_some()).count();
        v.borrow_mut().clear();
        left
    })
}
