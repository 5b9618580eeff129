//! Named tensors in safetensors files: a [`ParamLayout`]'s flat buffer written under the
//! layout's (Hugging Face) names, and read back into a flat buffer.
//!
//! Writing shards the tensors, in layout order, into files of at most `max_shard_bytes`
//! (`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, as transformers
//! does) or one `model.safetensors` when they fit. Reading finds every tensor of the layout
//! by name, requires its exact shape, converts bf16/f16 to f32, and refuses tensors it does
//! not know (except inert buffers some exporters include).

use ondol_core::{Error, Result};
use ondol_model::ParamLayout;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors stores little-endian data; ondol reinterprets f32 buffers as bytes");

fn as_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns, u8 has alignment 1, and the length
    // covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Writes `file` with the given tensors and fsyncs it.
pub fn write_file(
    path: &Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (*name, TensorView::new(Dtype::F32, shape.clone(), as_bytes(data)).expect("shape matches data"))
        })
        .collect();
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))?;
    // The safetensors crate creates files readable by their owner only; model files are
    // meant to be shared like the JSON beside them.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(format!("cannot set permissions of {}", path.display()), e))?;
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(format!("cannot sync {}", path.display()), e))
}

/// What a flat buffer written or read holds: a model's weights, which files store as
/// transformers reads them (see `ParamInfo::stored_minus_one`), or values stored as they are
/// (AdamW's moments; the exact norm scales of a checkpoint that resumes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    Weights,
    AsIs,
}

/// Writes `flat` (laid out by `layout`) as `<dir>/<stem>.safetensors`, or as numbered shards
/// plus `<stem>.safetensors.index.json` when it exceeds `max_shard_bytes`. Returns the file names.
pub fn write_layout(
    dir: &Path,
    stem: &str,
    layout: &ParamLayout,
    flat: &[f32],
    contents: Contents,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    assert_eq!(flat.len(), layout.total());
    // (Gemma 3's norm weights, a few per layer: the rest is written from `flat` itself.)
    let stored: Vec<Option<Vec<f32>>> = layout
        .params()
        .iter()
        .map(|p| {
            let shifted = contents == Contents::Weights && p.stored_minus_one;
            shifted.then(|| flat[p.range()].iter().map(|v| v - 1.0).collect())
        })
        .collect();
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0u64;
    for (i, p) in layout.params().iter().enumerate() {
        let size = 4 * p.len() as u64;
        if bytes > 0 && bytes + size > max_shard_bytes {
            shards.push(Vec::new());
            bytes = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        bytes += size;
    }
    let params = layout.params();
    let tensors_of = |idx: &[usize]| -> Vec<(&str, Vec<usize>, &[f32])> {
        let data = |i: usize| stored[i].as_deref().unwrap_or(&flat[params[i].range()]);
        idx.iter().map(|&i| (params[i].name.as_str(), params[i].shape.clone(), data(i))).collect()
    };
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        let name = format!("{stem}.safetensors");
        write_file(&dir.join(&name), &tensors_of(&shards[0]), meta)?;
        return Ok(vec![name]);
    }
    let n = shards.len();
    let mut names = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    for (s, idx) in shards.iter().enumerate() {
        let name = format!("{stem}-{:05}-of-{n:05}.safetensors", s + 1);
        write_file(&dir.join(&name), &tensors_of(idx), meta.clone())?;
        for &i in idx {
            weight_map.insert(params[i].name.clone(), name.clone());
        }
        names.push(name);
    }
    let index = json!({ "metadata": { "total_size": 4 * flat.len() }, "weight_map": weight_map });
    let index_name = format!("{stem}.safetensors.index.json");
    write_json(&dir.join(&index_name), &index)?;
    names.push(index_name);
    Ok(names)
}

/// Writes pretty JSON and fsyncs it.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n")
        .and_then(|_| File::open(path)?.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// The safetensors files of `<dir>/<stem>`: the single file, or the shards its index names.
pub fn files_of(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(format!("{stem}.safetensors.index.json"));
    let text = std::fs::read_to_string(&index_path).map_err(|_| {
        Error::Input(format!("{}: neither {stem}.safetensors nor {stem}.safetensors.index.json found", dir.display()))
    })?;
    let index: Value =
        serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", index_path.display())))?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Input(format!("{}: no \"weight_map\" object", index_path.display())))?;
    let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Tensors that some exporters store but that are not parameters (causal-mask buffers,
/// cached rotary frequencies), and the image model of a Gemma 3 image-text checkpoint, whose
/// text model alone is imported: skipped on import.
fn is_skipped(name: &str) -> bool {
    let image_model = ["vision_tower.", "multi_modal_projector."];
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
        || image_model
            .iter()
            .any(|p| name.starts_with(p) || name.strip_prefix("model.").is_some_and(|n| n.starts_with(p)))
}

/// The name of a tensor stored under another model's names, as the model ondol reads it:
/// EXAONE 3's as Llama's (`transformer.h.0.attn.attention.q_proj.weight` is
/// `model.layers.0.self_attn.q_proj.weight`, as transformers renames them on loading), and the
/// text model's of a Gemma 3 image-text checkpoint as Gemma3ForCausalLM's
/// (`language_model.model.layers.0...`, or `model.language_model.layers.0...` as transformers
/// names them in memory, is `model.layers.0...`).
fn renamed(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("language_model.").or_else(|| name.strip_prefix("model.language_model.")) {
        return Some(if rest.starts_with("model.") || rest.starts_with("lm_head.") {
            rest.to_string()
        } else {
            format!("model.{rest}")
        });
    }
    exaone_tensor_as_llama(name)
}

/// The Llama name of an EXAONE 3 tensor, as transformers renames them on loading.
fn exaone_tensor_as_llama(name: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 10] = [
        ("transformer.wte.", "model.embed_tokens."),
        ("transformer.h.", "model.layers."),
        ("transformer.ln_f.", "model.norm."),
        (".attn.attention.", ".self_attn."),
        (".self_attn.out_proj.", ".self_attn.o_proj."),
        (".ln_1.", ".input_layernorm."),
        (".ln_2.", ".post_attention_layernorm."),
        (".mlp.c_fc_0.", ".mlp.gate_proj."),
        (".mlp.c_fc_1.", ".mlp.up_proj."),
        (".mlp.c_proj.", ".mlp.down_proj."),
    ];
    name.starts_with("transformer.")
        .then(|| RENAMES.iter().fold(name.to_string(), |n, (from, to)| n.replacen(from, to, 1)))
}

/// Reads every tensor of `layout` from `files` into a new flat buffer. Names may carry or
/// lack a `transformer.` prefix (original GPT-2 files lack it), a Llama's may be EXAONE 3's and
/// a Gemma 3's an image-text checkpoint's (see [`renamed`]). Missing tensors, unknown tensors, wrong shapes and unsupported dtypes are errors
/// naming the file and tensor.
pub fn read_layout(files: &[PathBuf], layout: &ParamLayout, contents: Contents) -> Result<Vec<f32>> {
    let mut flat = vec![0.0f32; layout.total()];
    let mut seen = vec![false; layout.params().len()];
    let by_name: HashMap<&str, usize> = layout.params().iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    for path in files {
        let file = File::open(path).map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        // SAFETY: the file is only read, and a concurrent writer would at worst corrupt the
        // values we copy, which the caller's checksums catch.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(format!("cannot map {}", path.display()), e))?;
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| Error::Input(format!("{}: not a valid safetensors file: {e}", path.display())))?;
        for (name, view) in st.iter() {
            let alt = name.strip_prefix("transformer.").map(str::to_string).unwrap_or(format!("transformer.{name}"));
            let renamed = renamed(name);
            let found = by_name.get(name).or_else(|| by_name.get(alt.as_str()));
            let Some(&i) = found.or_else(|| by_name.get(renamed.as_deref()?)) else {
                if is_skipped(name) {
                    continue;
                }
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is not a parameter of this model",
                    path.display()
                )));
            };
            let p = &layout.params()[i];
            if seen[i] {
                // (Under two of the names it may have: `X` and `transformer.X`, say.)
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` is `{}` again, which an earlier tensor gave",
                    path.display(),
                    p.name
                )));
            }
            if view.shape() != p.shape.as_slice() {
                return Err(Error::Input(format!(
                    "{}: tensor `{name}` has shape {:?}, the model needs {:?}",
                    path.display(),
                    view.shape(),
                    p.shape
                )));
            }
            let values = &mut flat[p.range()];
            convert(view.dtype(), view.data(), values)
                .map_err(|why| Error::Input(format!("{}: tensor `{name}`: {why}", path.display())))?;
            if contents == Contents::Weights && p.stored_minus_one {
                values.iter_mut().for_each(|v| *v += 1.0);
            }
            seen[i] = true;
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(Error::Input(format!("tensor `{}` is missing from {}", layout.params()[i].name, names.join(", "))));
    }
    Ok(flat)
}

/// Little-endian bytes of `dtype` to f32.
fn convert(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    match dtype {
        Dtype::F32 => out
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::BF16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = ondol_core::bf16::to_f32(u16::from_le_bytes([b[0], b[1]]))),
        Dtype::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]))),
        other => return Err(format!("dtype {other:?} is not supported (F32, BF16 or F16)")),
    }
    Ok(())
}

/// IEEE half precision to single, including subnormals, infinities and NaN.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m * 2^-24, exact in f32.
            let v = m as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversions() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        let mut out = [0.0f32; 1];
        convert(Dtype::BF16, &0x3f80u16.to_le_bytes(), &mut out).unwrap();
        assert_eq!(out[0], 1.0);
    }
}
