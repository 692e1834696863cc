//! Memory-mapped safetensors files: header parsed once, tensors read on
//! demand straight from the mapping, every error naming the file.
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use tch::{Kind, Tensor};

pub struct TensorFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl TensorFile {
    /// Opens a model's or LoRA's file; a damaged one is to be fetched again.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_advice(path, "download or convert it again")
    }

    /// Opens `path`; `advice` says what to do if it is damaged (a cache
    /// shard is encoded again, a state falls back to an earlier one).
    pub fn open_with_advice(path: &Path, advice: &str) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the mapping is read-only; a file changed underneath us while
        // loading gives wrong numbers, not memory unsafety on Linux.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a readable safetensors file ({e}); it may be truncated or corrupt, {advice}",
                path.display()
            )
        })?;
        Ok(TensorFile { path: path.to_path_buf(), mmap, header_len, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the whole file, lowercase hex.
    pub fn sha256(&self) -> String {
        crate::fsutil::sha256_hex(&self.mmap[..])
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The `__metadata__` strings of the header.
    pub fn string_metadata(&self) -> HashMap<String, String> {
        self.metadata.metadata().clone().unwrap_or_default()
    }

    /// Reads tensor `name` in its stored dtype onto the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (range, shape, kind) = self.locate(name)?;
        Tensor::f_from_data_size(&self.mmap[range], &shape, kind)
            .with_context(|| format!("{}: cannot read tensor {name}", self.path.display()))
    }

    /// The stored kind of tensor `name`.
    pub fn kind(&self, name: &str) -> Result<Kind> {
        Ok(self.locate(name)?.2)
    }

    /// Byte range in the mapping, shape and kind of tensor `name`.
    fn locate(&self, name: &str) -> Result<(std::ops::Range<usize>, Vec<i64>, Kind)> {
        let info = self
            .info(name)
            .with_context(|| format!("{} has no tensor {name}", self.path.display()))?;
        let kind = kind_of(info.dtype).with_context(|| {
            format!("{}: tensor {name} has dtype {:?}, which sdtune cannot read", self.path.display(), info.dtype)
        })?;
        let start = 8 + self.header_len + info.data_offsets.0;
        let end = 8 + self.header_len + info.data_offsets.1;
        if end > self.mmap.len() {
            bail!(
                "{}: tensor {name} lies past the end of the file; the file is truncated, download or convert it again",
                self.path.display()
            );
        }
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        Ok((start..end, shape, kind))
    }

    /// Runs `f` on tensor `name` as a CPU tensor that borrows the file's
    /// memory mapping: nothing is copied, so `f` can copy it straight into a
    /// weight of another dtype or device. `f` must not keep the tensor (or a
    /// view of it) beyond its return.
    pub(crate) fn with_view<R>(&self, name: &str, f: impl FnOnce(&Tensor) -> Result<R>) -> Result<R> {
        let (range, shape, kind) = self.locate(name)?;
        let bytes = &self.mmap[range];
        if bytes.is_empty() || !(bytes.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
            // Empty or misaligned data (files not written by the safetensors
            // library): a copy is safe where a view is not.
            let owned = Tensor::f_from_data_size(bytes, &shape, kind)
                .with_context(|| format!("{}: cannot read tensor {name}", self.path.display()))?;
            return f(&owned);
        }
        // SAFETY: `bytes` is a live, aligned, read-only mapping of exactly
        // numel * element size bytes (validated by the header parser), kept
        // alive by `self` for the duration of `f`, and the view is dropped
        // before this returns; torch never writes through it.
        let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], kind, tch::Device::Cpu) }
            .with_context(|| format!("{}: cannot read tensor {name}", self.path.display()))?;
        let result = f(&view);
        drop(view);
        result
    }

    /// Drops tensor `name`'s pages from this process's resident memory once
    /// it has been copied (they stay in the page cache; a later read maps
    /// them again), so loading never holds the whole file resident.
    pub fn release(&self, name: &str) {
        if let Ok((range, _, _)) = self.locate(name) {
            if range.is_empty() {
                return;
            }
            // SAFETY: a read-only file mapping that was never written: the
            // dropped pages are read back from the file on the next access,
            // and no reference into them outlives the `with_view` call that
            // used them.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// The safetensors dtype for a tch kind (for writing files).
pub fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store tensors of kind {other:?} in safetensors"),
    })
}

/// Writes named tensors (moved to CPU, contiguous) to `path` atomically,
/// with `metadata` as the header's `__metadata__`.
pub fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = serialize_tensors(tensors, metadata).with_context(|| format!("cannot write {}", path.display()))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// The bytes of a safetensors file holding `tensors`. The same tensors and
/// metadata always give the same bytes: the header's keys are sorted.
pub fn serialize_tensors(tensors: &[(String, Tensor)], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).with_context(|| format!("tensor {name}"))?;
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel)
            .with_context(|| format!("cannot copy tensor {name} to memory"))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .with_context(|| format!("tensor {name} has inconsistent size"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).context("cannot serialize the tensors")?;
    sort_header(bytes)
}

/// Rewrites the JSON header with its keys in sorted order (the library
/// writes `__metadata__` in hash-map order, which differs run to run),
/// padded with spaces to 8 bytes as the format asks. Offsets are absolute
/// within the data, so the order of the header's entries is free.
fn sort_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).context("the header just written does not parse")?;
    // serde_json's map is a BTreeMap here: serializing sorts the keys.
    let mut json = serde_json::to_vec(&header)?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let t = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let tensors = vec![("b".to_string(), t.shallow_clone()), ("a".to_string(), t.shallow_clone())];
        let meta: HashMap<String, String> = (0..40).map(|i| (format!("key{i}"), i.to_string())).collect();
        let first = serialize_tensors(&tensors, Some(meta.clone())).unwrap();
        for _ in 0..5 {
            // A fresh map each time: another hash seed, another iteration order.
            let again: HashMap<String, String> = meta.clone().into_iter().collect();
            assert_eq!(serialize_tensors(&tensors, Some(again)).unwrap(), first);
        }
        let back = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(back.tensor("a").unwrap().shape(), [2, 3]);
        let (n, header) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(n % 8, 0);
        assert_eq!(header.metadata().as_ref().unwrap()["key7"], "7");
    }
}
