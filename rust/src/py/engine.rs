use super::c_contiguous_slice;
use super::errors::raise;
use crate::engine::files::{open_model, write_shards as core_write_shards};
use crate::engine::model::{FfnPart, Model as CoreModel, Session as CoreSession};
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::path::PathBuf;

/// A llama-architecture model (a GGUF file, a gguf-split set or a shard directory), memory-mapped
/// under an optional budget, computed on its quantized weights.
#[pyclass(module = "splitwise_core._core", frozen)]
pub struct Model {
    inner: CoreModel,
}

/// The KV cache of one generation on this side (per layer and KV group, created on demand).
#[pyclass(module = "splitwise_core._core")]
pub struct Session {
    inner: CoreSession,
}

fn rows_of<'a>(what: &str, x: &'a PyReadonlyArray2<'_, f32>, width: usize) -> PyResult<(&'a [f32], usize)> {
    let shape = x.shape();
    if shape[1] != width {
        return Err(raise(
            "ShapeMismatchError",
            format!("{what} must have shape (T, {width}), got ({}, {})", shape[0], shape[1]),
        ));
    }
    Ok((c_contiguous_slice(what, x)?, shape[0]))
}

/// Hands `values` to numpy without copying, as one 2-D array (no reshaped view on top: every
/// sub-block call of the split executor pays for the objects it creates).
fn to_array2<'py>(py: Python<'py>, values: Vec<f32>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let array = numpy::ndarray::Array2::from_shape_vec((rows, cols), values)
        .map_err(|e| raise("ShapeMismatchError", format!("result of {rows}x{cols} values: {e}")))?;
    Ok(array.into_pyarray(py))
}

fn parse_part(part: &str) -> PyResult<FfnPart> {
    match part {
        "full" => Ok(FfnPart::Full),
        "gate_up" => Ok(FfnPart::GateUp),
        "down" => Ok(FfnPart::Down),
        other => Err(raise(
            "InvalidArgumentError",
            format!("FFN part must be \"full\", \"gate_up\" or \"down\", got {other:?}"),
        )),
    }
}

impl Model {
    /// One RMSNorm over T rows of width d, whichever norm weight `apply` uses.
    fn norm<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
        apply: impl FnOnce(&[f32], &mut [f32]) -> crate::error::CoreResult<()> + Send,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.config().n_embd;
        let (xs, t) = rows_of("x", &x, d)?;
        let mut out = vec![0f32; xs.len()];
        py.detach(|| apply(xs, &mut out))?;
        to_array2(py, out, t, d)
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, threads = 1, *, memory_budget_bytes = None, layers = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: usize,
        memory_budget_bytes: Option<u64>,
        layers: Option<Vec<usize>>,
    ) -> PyResult<Self> {
        if threads == 0 {
            return Err(raise("InvalidArgumentError", "threads must be >= 1".to_string()));
        }
        let inner = py.detach(|| open_model(&path, threads, layers.as_deref(), memory_budget_bytes))?;
        Ok(Model { inner })
    }

    /// Layers this instance computes (the others are refused).
    #[getter]
    fn served_layers(&self) -> Vec<usize> {
        self.inner.served_layers()
    }

    /// Keeps the weight files of `layers` (those a plan runs on this device) mapped and unmaps the
    /// other layers' files, under the memory budget; a no-op when everything stays mapped.
    fn retain_layers(&self, py: Python<'_>, layers: Vec<usize>) -> PyResult<()> {
        py.detach(|| self.inner.retain_layers(&layers))?;
        Ok(())
    }

    /// Mapped weight bytes against the budget, and how often files were loaded and evicted.
    fn weight_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.weight_stats().unwrap_or_default();
        let d = PyDict::new(py);
        d.set_item("budget_bytes", s.budget_bytes)?;
        d.set_item("mapped_bytes", s.mapped_bytes)?;
        d.set_item("peak_mapped_bytes", s.peak_mapped_bytes)?;
        d.set_item("pinned_bytes", s.pinned_bytes)?;
        d.set_item("mapped_files", s.mapped_files)?;
        d.set_item("files", s.files)?;
        d.set_item("loads", s.loads)?;
        d.set_item("evictions", s.evictions)?;
        Ok(d)
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("architecture", c.arch.name())?;
        d.set_item("n_layer", c.n_layer)?;
        d.set_item("n_embd", c.n_embd)?;
        d.set_item("n_head", c.n_head)?;
        d.set_item("n_head_kv", c.n_head_kv)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("n_ff", c.n_ff)?;
        d.set_item("n_vocab", c.n_vocab)?;
        d.set_item("rope_theta", c.rope_theta)?;
        d.set_item("norm_eps", c.norm_eps)?;
        d.set_item("context_length", c.context_length)?;
        d.set_item("tied_output", c.tied_output)?;
        Ok(d)
    }

    fn new_session(&self) -> Session {
        Session {
            inner: CoreSession::new(self.inner.config()),
        }
    }

    #[pyo3(signature = (tokens, positions=None))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        positions: Option<Vec<u32>>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.config().n_embd;
        let mut out = vec![0f32; tokens.len() * d];
        py.detach(|| self.inner.embed(&tokens, positions.as_deref(), &mut out))?;
        to_array2(py, out, tokens.len(), d)
    }

    fn attn_norm<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        self.norm(py, x, |xs, out| self.inner.attn_norm(layer, xs, out))
    }

    fn ffn_norm<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        self.norm(py, x, |xs, out| self.inner.ffn_norm(layer, xs, out))
    }

    fn attention<'py>(
        &self,
        py: Python<'py>,
        mut session: PyRefMut<'py, Session>,
        layer: usize,
        heads: Vec<usize>,
        x_norm: PyReadonlyArray2<'py, f32>,
        positions: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.config().n_embd;
        let (xs, t) = rows_of("x_norm", &x_norm, d)?;
        let mut out = vec![0f32; xs.len()];
        let session = &mut session.inner;
        py.detach(|| {
            self.inner
                .in_pool(|| self.inner.attention(session, layer, &heads, xs, &positions, &mut out))
        })?;
        to_array2(py, out, t, d)
    }

    fn ffn<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        part: &str,
        input: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let part = parse_part(part)?;
        let c = self.inner.config();
        let (width_in, width_out) = match part {
            FfnPart::Full => (c.n_embd, c.n_embd),
            FfnPart::GateUp => (c.n_embd, c.n_ff),
            FfnPart::Down => (c.n_ff, c.n_embd),
        };
        let (xs, t) = rows_of("input", &input, width_in)?;
        let mut out = vec![0f32; t * width_out];
        py.detach(|| self.inner.in_pool(|| self.inner.ffn(layer, part, xs, t, &mut out)))?;
        to_array2(py, out, t, width_out)
    }

    fn output_logits<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let c = self.inner.config();
        let (xs, t) = rows_of("x", &x, c.n_embd)?;
        let mut out = vec![0f32; t * c.n_vocab];
        py.detach(|| self.inner.in_pool(|| self.inner.output_logits(xs, t, &mut out)))?;
        to_array2(py, out, t, c.n_vocab)
    }

    fn layer_fused<'py>(
        &self,
        py: Python<'py>,
        mut session: PyRefMut<'py, Session>,
        layer: usize,
        x: PyReadonlyArray2<'py, f32>,
        positions: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.config().n_embd;
        let (xs, t) = rows_of("x", &x, d)?;
        let mut state = xs.to_vec();
        let session = &mut session.inner;
        py.detach(|| {
            self.inner
                .in_pool(|| self.inner.layer_fused(session, layer, &mut state, &positions))
        })?;
        to_array2(py, state, t, d)
    }

    #[pyo3(signature = (session, tokens, positions, all_logits = false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        mut session: PyRefMut<'py, Session>,
        tokens: Vec<u32>,
        positions: Vec<u32>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let vocab = self.inner.config().n_vocab;
        let session = &mut session.inner;
        let logits = py.detach(|| {
            self.inner
                .in_pool(|| self.inner.forward(session, &tokens, &positions, all_logits))
        })?;
        let rows = logits.len() / vocab;
        to_array2(py, logits, rows, vocab)
    }
}

#[pymethods]
impl Session {
    /// Positions cached for `layer` and KV `group` (0 where that group never ran here).
    fn cached(&self, layer: usize, group: usize) -> usize {
        self.inner.len(layer, group)
    }

    fn truncate(&mut self, n_positions: usize) {
        self.inner.truncate(n_positions)
    }

    fn clear(&mut self) {
        self.inner.clear()
    }

    #[getter]
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }
}

/// The kernel family matmuls run with: the CPU's best, or the lower one `SPLITWISE_SIMD` names.
#[pyfunction]
pub fn simd_level() -> PyResult<&'static str> {
    Ok(crate::engine::kernels::simd_level()?.name())
}

/// Writes the role shards of the model at `source` into the existing directory `out_dir`;
/// `progress(shard)` is called with each written shard's dict. Returns the source hash, the
/// layer count and the shard dicts. An exception in `progress` stops the writing and is raised.
#[pyfunction]
#[pyo3(signature = (source, out_dir, progress = None))]
pub fn write_shards<'py>(
    py: Python<'py>,
    source: PathBuf,
    out_dir: PathBuf,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let progress = progress.map(Bound::unbind);
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        core_write_shards(&source, &out_dir, &mut |shard| {
            let Some(callback) = &progress else {
                return true;
            };
            Python::attach(|py| {
                let outcome = shard_dict(py, shard).and_then(|d| callback.bind(py).call1((d,)));
                match outcome {
                    Ok(_) => true,
                    Err(err) => {
                        callback_error = Some(err);
                        false
                    }
                }
            })
        })
    });
    if let Some(err) = callback_error {
        return Err(err);
    }
    let summary = result?;
    let d = PyDict::new(py);
    d.set_item("source_sha256", &summary.source_sha256)?;
    d.set_item("n_layer", summary.n_layer)?;
    let shards = PyList::empty(py);
    for shard in &summary.shards {
        shards.append(shard_dict(py, shard)?)?;
    }
    d.set_item("shards", shards)?;
    Ok(d)
}

fn shard_dict<'py>(py: Python<'py>, shard: &crate::engine::files::WrittenShard) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", shard.path.display().to_string())?;
    d.set_item("role", shard.role)?;
    d.set_item("layer", shard.layer)?;
    d.set_item("bytes", shard.bytes)?;
    d.set_item("tensors", shard.tensors)?;
    Ok(d)
}
