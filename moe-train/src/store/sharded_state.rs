//! The optimizer's state of placed experts, gathered to save and split to resume, so that a
//! checkpoint does not depend on the number of devices that trained it.
//!
//! Burn's optimizer keeps its state per parameter, under the parameter's id: a tensor
//! `"{id}.{field}"` of the parameter's shape for each moment (AdamW's two), and scalars
//! `"{id}.{field}"` (the step count). Under an expert placement each device's shard of an
//! expert stack is a parameter of its own ([`ShardedParam`]), so the state is too. Saving
//! concatenates the shards' state tensors along the experts (dimension 0) under the gathered
//! id, which the saved model's stack has; resuming on other devices cuts them again. The
//! record is read and written in Burn's own burnpack form, untouched but for these entries.

use std::collections::BTreeMap;

use burn::module::ParamId;
use burn::tensor::Bytes;
use burn_pack::{DType, Reader, Scalar, Shape, Writer};
use moe_core::placement::ShardedParam;

/// One tensor of a burnpack: name, type, shape, parameter id, bytes.
struct Entry {
    name: String,
    dtype: DType,
    shape: Shape,
    param_id: Option<u64>,
    bytes: Vec<u8>,
}

/// A burnpack's content, to rewrite.
struct Pack {
    tensors: Vec<Entry>,
    scalars: BTreeMap<String, Scalar>,
    metadata: BTreeMap<String, String>,
}

impl Pack {
    fn read(bytes: Bytes) -> Result<Self, String> {
        let reader = Reader::from_bytes(bytes).map_err(|e| e.to_string())?;
        let scalars = reader.scalars().clone();
        let metadata = reader.metadata().clone();
        let tensors = reader
            .into_tensors()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|tensor| {
                let (name, dtype, shape, param_id, bytes) =
                    tensor.into_parts().map_err(|e| e.to_string())?;
                Ok(Entry {
                    name,
                    dtype,
                    shape,
                    param_id,
                    bytes: bytes.to_vec(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            tensors,
            scalars,
            metadata,
        })
    }

    fn write(self) -> Result<Bytes, String> {
        let tensors = self
            .tensors
            .into_iter()
            .map(|entry| {
                burn_pack::Tensor::new(
                    entry.name,
                    entry.dtype,
                    entry.shape,
                    entry.param_id,
                    Bytes::from_bytes_vec(entry.bytes),
                )
            })
            .collect();
        let mut writer = Writer::new(tensors);
        for (key, value) in &self.scalars {
            writer = writer.with_scalar(key, *value);
        }
        for (key, value) in &self.metadata {
            writer = writer.with_metadata(key, value);
        }
        writer.into_bytes().map_err(|e| e.to_string())
    }

    /// Takes out the tensors of parameter `id`, keyed by their field (the name after the id).
    fn take_tensors(&mut self, id: u64) -> BTreeMap<String, Entry> {
        let prefix = format!("{id}.");
        let (mine, rest): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.tensors)
            .into_iter()
            .partition(|entry| entry.param_id == Some(id));
        self.tensors = rest;
        mine.into_iter()
            .map(|entry| {
                let field = entry
                    .name
                    .strip_prefix(&prefix)
                    .unwrap_or(&entry.name)
                    .to_string();
                (field, entry)
            })
            .collect()
    }

    /// Takes out the scalars and the path of parameter `id`, keyed by field ("" for the path).
    fn take_rest(&mut self, id: u64) -> (BTreeMap<String, Scalar>, Option<String>) {
        let prefix = format!("{id}.");
        let keys: Vec<String> = self
            .scalars
            .keys()
            .filter(|key| key.starts_with(&prefix))
            .cloned()
            .collect();
        let scalars = keys
            .into_iter()
            .filter_map(|key| {
                let value = self.scalars.remove(&key)?;
                Some((key[prefix.len()..].to_string(), value))
            })
            .collect();
        (scalars, self.metadata.remove(&id.to_string()))
    }

    /// Files the state of parameter `id`: `tensors` by field, `scalars` by field, its path.
    fn put(
        &mut self,
        id: u64,
        tensors: Vec<(String, Entry)>,
        scalars: &BTreeMap<String, Scalar>,
        path: Option<&String>,
    ) {
        for (field, entry) in tensors {
            self.tensors.push(Entry {
                name: format!("{id}.{field}"),
                param_id: Some(id),
                ..entry
            });
        }
        for (field, value) in scalars {
            self.scalars.insert(format!("{id}.{field}"), *value);
        }
        if let Some(path) = path {
            self.metadata.insert(id.to_string(), path.clone());
        }
    }
}

/// Bytes of one row (one expert) of `entry`.
fn row_bytes(entry: &Entry) -> usize {
    let dims = entry.shape.as_slice();
    dims.iter().skip(1).product::<usize>() * entry.dtype.size()
}

/// The optimizer record `bytes` (burnpack) with each placed parameter's shard states joined
/// into one state under its gathered id. A parameter whose shards do not all hold a state
/// (never stepped) keeps none.
pub fn gather(bytes: Bytes, sharded: &[ShardedParam]) -> Result<Bytes, String> {
    let mut pack = Pack::read(bytes)?;
    for param in sharded {
        let mut parts: Vec<BTreeMap<String, Entry>> = Vec::new();
        let mut first = None;
        for (index, (id, range)) in param.shards.iter().enumerate() {
            let tensors = pack.take_tensors(id.val());
            for (field, entry) in &tensors {
                if entry.shape.as_slice().first() != Some(&range.len()) {
                    return Err(format!(
                        "the optimizer's `{field}` of a shard has shape {:?}, not {} experts",
                        entry.shape.as_slice(),
                        range.len()
                    ));
                }
            }
            let rest = pack.take_rest(id.val());
            if index == 0 {
                first = Some(rest);
            }
            parts.push(tensors);
        }
        let Some((scalars, path)) = first else {
            continue;
        };
        let fields: Vec<String> = parts[0].keys().cloned().collect();
        if fields.is_empty() || parts.iter().any(|part| part.len() != fields.len()) {
            continue;
        }
        let mut joined = Vec::new();
        for field in fields {
            let mut pieces = parts.iter_mut().map(|part| part.remove(&field));
            let mut whole = pieces
                .next()
                .flatten()
                .expect("the first shard has the field");
            for piece in pieces {
                let piece =
                    piece.ok_or_else(|| format!("a shard lacks the optimizer's `{field}`"))?;
                whole.bytes.extend_from_slice(&piece.bytes);
                let mut dims = whole.shape.as_slice().to_vec();
                dims[0] += piece.shape.as_slice()[0];
                whole.shape = Shape::from(dims);
            }
            joined.push((field, whole));
        }
        pack.put(param.gathered.val(), joined, &scalars, path.as_ref());
    }
    pack.write()
}

/// The optimizer record `bytes` with each placed parameter's gathered state cut into its
/// shards' (the inverse of [`gather`]).
pub fn split(bytes: Bytes, sharded: &[ShardedParam]) -> Result<Bytes, String> {
    let mut pack = Pack::read(bytes)?;
    for param in sharded {
        let tensors = pack.take_tensors(param.gathered.val());
        let (scalars, path) = pack.take_rest(param.gathered.val());
        let experts = param.shards.last().map_or(0, |(_, range)| range.end);
        for (field, entry) in &tensors {
            if entry.shape.as_slice().first() != Some(&experts) {
                return Err(format!(
                    "the optimizer's `{field}` has shape {:?}, not {experts} experts",
                    entry.shape.as_slice()
                ));
            }
        }
        if tensors.is_empty() {
            continue;
        }
        for (id, range) in &param.shards {
            let pieces = tensors
                .iter()
                .map(|(field, entry)| {
                    let row = row_bytes(entry);
                    let mut dims = entry.shape.as_slice().to_vec();
                    dims[0] = range.len();
                    let piece = Entry {
                        name: String::new(),
                        dtype: entry.dtype,
                        shape: Shape::from(dims),
                        param_id: None,
                        bytes: entry.bytes[range.start * row..range.end * row].to_vec(),
                    };
                    (field.clone(), piece)
                })
                .collect();
            pack.put(id.val(), pieces, &scalars, path.as_ref());
        }
    }
    pack.write()
}

/// The optimizer record `bytes` with only the states of the parameters `keep` (a replica's
/// optimizer starts from the states of the parameters it updates, and holds no other).
pub fn keep_only(bytes: Bytes, keep: &[ParamId]) -> Result<Bytes, String> {
    let mut pack = Pack::read(bytes)?;
    let keep: std::collections::HashSet<u64> = keep.iter().map(|id| id.val()).collect();
    let ids: std::collections::BTreeSet<u64> = pack
        .tensors
        .iter()
        .filter_map(|entry| entry.param_id)
        .chain(
            pack.scalars
                .keys()
                .filter_map(|key| key.split_once('.')?.0.parse().ok()),
        )
        .collect();
    for id in ids.into_iter().filter(|id| !keep.contains(id)) {
        pack.take_tensors(id);
        pack.take_rest(id);
    }
    pack.write()
}
