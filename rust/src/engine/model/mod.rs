//! The model (llama, Qwen2, Qwen3, GPT-2) and its sub-block API.
//!
//! Every sub-block (embedding, the two RMSNorms, any subset of attention heads, the two FFN
//! parts, the LM head) is one call, so a plan can run each on either side of a split.
//! `layer_fused` runs a whole layer with the same helpers in one call for the all-local case.
//!
//! Math follows llama.cpp's LLAMA architecture: RMSNorm (`x / sqrt(mean(x²) + eps) * w`), RoPE
//! in llama.cpp's "normal" mode (rotating pairs `(2i, 2i+1)` of each head by
//! `pos · theta^(-2i/head_dim)`; the GGUF converter permutes Q/K rows to match), grouped-query
//! attention with causal mask and `1/sqrt(head_dim)` scale, SwiGLU FFN, and an LM head that is
//! either `output.weight` or the tied `token_embd.weight`. The other [`Architecture`]s are this
//! layer with llama.cpp's differences: Qwen2 adds biases to Q, K and V; Qwen3 RMS-normalises each
//! query and key head (`attn_q_norm`, `attn_k_norm`, before RoPE); both rotate pairs
//! `(i, i + head_dim/2)` (llama.cpp's NEOX RoPE; their converter does not permute). GPT-2 is the
//! most different: LayerNorm with bias, learned position embeddings added to the token's, a fused
//! Q/K/V matrix with bias and no RoPE, a bias after W_o (added by the partial that holds head 0,
//! so partials still add up), and a non-gated FFN `W2·gelu(W1·x + b1) + b2` whose two maps are
//! the [`FfnPart::GateUp`] and [`FfnPart::Down`] parts.

mod session;
mod source;
#[cfg(test)]
pub(crate) mod tests;

pub use session::Session;
pub use source::{MemorySource, TensorBytes, TensorRef, TensorSource, TensorView, WeightStats};

use crate::engine::gguf::{GgufFile, MetaValue};
use crate::engine::kernels::{dequantize_row, QMatrix};
use crate::error::{CoreError, CoreResult};
use rayon::prelude::*;
use session::Append;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The model families the engine runs: GGUF `general.architecture`, which is also the prefix of
/// their hyper-parameter keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Gpt2,
}

/// How RoPE pairs a head's dimensions, if the architecture rotates at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rope {
    /// `(2i, 2i+1)`: llama.cpp's "normal" mode.
    Adjacent,
    /// `(i, i + head_dim/2)`: llama.cpp's NEOX mode.
    Halves,
    /// No rotary embedding (GPT-2 learns absolute position embeddings instead).
    None,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gpt2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gpt2 => "gpt2",
        }
    }

    pub fn from_name(name: &str) -> Option<Architecture> {
        Architecture::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn rope(self) -> Rope {
        match self {
            Architecture::Llama => Rope::Adjacent,
            Architecture::Qwen2 | Architecture::Qwen3 => Rope::Halves,
            Architecture::Gpt2 => Rope::None,
        }
    }

    /// `attn_q.bias`, `attn_k.bias`, `attn_v.bias` are added after the projections (GPT-2's
    /// fused `attn_qkv.bias` goes with [`Architecture::is_gpt2`]).
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }

    /// GPT-2: one `attn_qkv` matrix (Q rows, then K, then V) instead of three, and biases after
    /// W_o and both FFN maps; LayerNorm (with bias) instead of RMSNorm; learned position
    /// embeddings; a GELU FFN without gate.
    pub fn is_gpt2(self) -> bool {
        self == Architecture::Gpt2
    }

    /// Every query and key head is RMS-normalised (`attn_q_norm`, `attn_k_norm`) before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }
}

/// Hyper-parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub rope_theta: f32,
    /// Epsilon of the RMSNorms (of the LayerNorms for GPT-2).
    pub norm_eps: f32,
    pub context_length: usize,
    pub tied_output: bool,
}

fn file_error(origin: &str, problem: impl Into<String>) -> CoreError {
    CoreError::ModelFile {
        path: origin.to_string(),
        problem: problem.into(),
    }
}

fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(msg.into())
}

fn optional_u32(f: &GgufFile, key: &str) -> CoreResult<Option<usize>> {
    if f.metadata(key).is_some() {
        Ok(Some(f.meta_u32(key)? as usize))
    } else {
        Ok(None)
    }
}

impl ModelConfig {
    /// Reads the `<arch>.*` metadata. Errors (`ModelFile`) for an architecture the engine does not
    /// run, missing keys, or features it does not implement (partial RoPE, RoPE scaling).
    pub fn from_gguf(f: &GgufFile) -> CoreResult<Self> {
        ModelConfig::from_metadata(f, &|name| f.tensor(name).map(|t| t.dims.clone()))
    }

    /// Like [`ModelConfig::from_gguf`] for a model whose tensors may lie in other files than
    /// the one holding the metadata (gguf-split sets): `tensor_dims` finds a tensor's dims.
    pub fn from_metadata(f: &GgufFile, tensor_dims: &dyn Fn(&str) -> Option<Vec<u64>>) -> CoreResult<Self> {
        let origin = f.path().display().to_string();
        let name = f.meta_str("general.architecture")?;
        let Some(arch) = Architecture::from_name(name) else {
            let supported: Vec<&str> = Architecture::ALL.iter().map(|a| a.name()).collect();
            return Err(file_error(
                &origin,
                format!(
                    "architecture {name:?} is not supported; supported: {}",
                    supported.join(", ")
                ),
            ));
        };
        let key = |k: &str| format!("{}.{k}", arch.name());
        let u = |k: &str| f.meta_u32(&key(k)).map(|v| v as usize);
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_head_kv = optional_u32(f, &key("attention.head_count_kv"))?.unwrap_or(n_head);
        let head_dim = match optional_u32(f, &key("attention.key_length"))? {
            Some(v) => v,
            None if n_head > 0 && n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(file_error(
                    &origin,
                    format!("embedding length {n_embd} is not a multiple of {n_head} heads"),
                ))
            }
        };
        if let Some(vl) = optional_u32(f, &key("attention.value_length"))? {
            if vl != head_dim {
                return Err(file_error(
                    &origin,
                    format!("value length {vl} differs from key length {head_dim}; not supported"),
                ));
            }
        }
        if let Some(rot) = optional_u32(f, &key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(file_error(
                    &origin,
                    format!("partial RoPE ({rot} of {head_dim} dims) is not supported"),
                ));
            }
        }
        if let Some(MetaValue::Str(s)) = f.metadata(&key("rope.scaling.type")) {
            if s != "none" {
                return Err(file_error(&origin, format!("RoPE scaling {s:?} is not supported")));
            }
        }
        if tensor_dims("rope_freqs.weight").is_some() {
            return Err(file_error(
                &origin,
                "rope_freqs.weight (llama-3 RoPE frequency factors) is not supported",
            ));
        }
        let n_vocab = match optional_u32(f, &key("vocab_size"))? {
            Some(v) => v,
            None => match tensor_dims("token_embd.weight") {
                Some(dims) if dims.len() == 2 => dims[1] as usize,
                _ => return Err(file_error(&origin, "token_embd.weight missing or not 2-D")),
            },
        };
        let norm_eps_key = if arch.is_gpt2() {
            "attention.layer_norm_epsilon"
        } else {
            "attention.layer_norm_rms_epsilon"
        };
        let rope_theta = if f.metadata(&key("rope.freq_base")).is_some() {
            f.meta_f32(&key("rope.freq_base"))?
        } else {
            10000.0
        };
        let cfg = ModelConfig {
            arch,
            n_layer: u("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: u("feed_forward_length")?,
            n_vocab,
            rope_theta,
            norm_eps: f.meta_f32(&key(norm_eps_key))?,
            context_length: u("context_length")?,
            tied_output: tensor_dims("output.weight").is_none(),
        };
        cfg.validate().map_err(|e| file_error(&origin, e.to_string()))?;
        Ok(cfg)
    }

    /// Consistency of the numbers themselves (nonzero sizes, whole GQA groups, even head_dim).
    pub fn validate(&self) -> CoreResult<()> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("head_dim", self.head_dim),
            ("n_ff", self.n_ff),
            ("n_vocab", self.n_vocab),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(format!("model config: {name} is 0")));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(invalid(format!(
                "model config: {} query heads are not a multiple of {} KV heads",
                self.n_head, self.n_head_kv
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "model config: head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            )));
        }
        if !(self.rope_theta > 0.0 && self.norm_eps >= 0.0) {
            return Err(invalid(format!(
                "model config: rope_theta {} / norm_eps {} out of range",
                self.rope_theta, self.norm_eps
            )));
        }
        Ok(())
    }

    /// KV group (KV head) that query head `head` reads.
    pub fn kv_group_of_head(&self, head: usize) -> usize {
        head / (self.n_head / self.n_head_kv)
    }

    /// Query heads reading KV group `group`.
    pub fn heads_of_kv_group(&self, group: usize) -> std::ops::Range<usize> {
        let per = self.n_head / self.n_head_kv;
        group * per..(group + 1) * per
    }
}

/// Which part of a SwiGLU FFN to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnPart {
    /// x_norm (T×d) -> T×d.
    Full,
    /// x_norm (T×d) -> silu(gate)·up (T×n_ff).
    GateUp,
    /// T×n_ff -> T×d.
    Down,
}

struct LayerNames {
    attn_norm: String,
    attn_q: String,
    attn_k: String,
    attn_v: String,
    attn_output: String,
    ffn_norm: String,
    ffn_gate: String,
    ffn_up: String,
    ffn_down: String,
    attn_q_bias: String,
    attn_k_bias: String,
    attn_v_bias: String,
    attn_q_norm: String,
    attn_k_norm: String,
    // GPT-2's
    attn_qkv: String,
    attn_qkv_bias: String,
    attn_output_bias: String,
    attn_norm_bias: String,
    ffn_norm_bias: String,
    ffn_up_bias: String,
    ffn_down_bias: String,
}

impl LayerNames {
    fn new(l: usize) -> LayerNames {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let b = |s: &str| format!("blk.{l}.{s}.bias");
        LayerNames {
            attn_norm: n("attn_norm"),
            attn_q: n("attn_q"),
            attn_k: n("attn_k"),
            attn_v: n("attn_v"),
            attn_output: n("attn_output"),
            ffn_norm: n("ffn_norm"),
            ffn_gate: n("ffn_gate"),
            ffn_up: n("ffn_up"),
            ffn_down: n("ffn_down"),
            attn_q_bias: b("attn_q"),
            attn_k_bias: b("attn_k"),
            attn_v_bias: b("attn_v"),
            attn_q_norm: n("attn_q_norm"),
            attn_k_norm: n("attn_k_norm"),
            attn_qkv: n("attn_qkv"),
            attn_qkv_bias: b("attn_qkv"),
            attn_output_bias: b("attn_output"),
            attn_norm_bias: b("attn_norm"),
            ffn_norm_bias: b("ffn_norm"),
            ffn_up_bias: b("ffn_up"),
            ffn_down_bias: b("ffn_down"),
        }
    }
}

/// A layer's per-head extras of the non-llama architectures, read once per attention call.
struct HeadExtras {
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o_bias: Option<Vec<f32>>,
}

/// The Q, K and V projections: three matrices, or row ranges of GPT-2's fused one. Q's rows start
/// at row 0, K's (V's) rows start at `k_offset` (`v_offset`) of its matrix.
struct Projections {
    q: Matrix,
    k: Matrix,
    v: Matrix,
    k_offset: usize,
    v_offset: usize,
}

/// A model computed on its stored (possibly quantized) weights.
pub struct Model {
    cfg: ModelConfig,
    source: Arc<dyn TensorSource>,
    origin: String,
    layers: Vec<LayerNames>,
    /// Layers this instance computes; the others are refused (their weights may be absent).
    served: Vec<bool>,
    /// Layers whose tensors passed the shape checks (all served ones at open for a source that
    /// is entirely resident, otherwise each on its first use).
    checked: Vec<AtomicBool>,
    lm_head: &'static str,
    pool: rayon::ThreadPool,
}

/// A weight matrix whose shape and byte size were checked; keeps its bytes alive while in use.
struct Matrix {
    tensor: TensorRef,
    rows: usize,
    cols: usize,
}

impl Matrix {
    fn q(&self) -> QMatrix<'_> {
        let t = self.tensor.view();
        QMatrix::new(t.ty, self.rows, self.cols, t.data).expect("checked when the Matrix was made")
    }

    #[cfg(test)]
    fn row(&self, r: usize, out: &mut [f32]) {
        self.q().row(r, out)
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("cfg", &self.cfg)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Opens a GGUF model: reads the config, checks that every tensor is present with
    /// the right shape and byte size. `threads` = 0 lets rayon pick.
    pub fn from_gguf(file: Arc<GgufFile>, threads: usize) -> CoreResult<Model> {
        let cfg = ModelConfig::from_gguf(&file)?;
        Model::from_source(cfg, Arc::new(file), threads)
    }

    /// A model whose weights come from `source` (GGUF tensor names). `threads` = 0 lets rayon
    /// pick.
    pub fn from_source(cfg: ModelConfig, source: Arc<dyn TensorSource>, threads: usize) -> CoreResult<Model> {
        Model::serving(cfg, source, threads, None)
    }

    /// Like [`Model::from_source`], computing only `layers` (all if `None`): the other layers'
    /// weights are never read and calls on them are refused.
    pub fn serving(
        cfg: ModelConfig,
        source: Arc<dyn TensorSource>,
        threads: usize,
        layers: Option<&[usize]>,
    ) -> CoreResult<Model> {
        cfg.validate()?;
        let served = served_mask(cfg.n_layer, layers)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| invalid(format!("cannot build a thread pool of {threads}: {e}")))?;
        let model = Model {
            origin: source.origin(),
            layers: (0..cfg.n_layer).map(LayerNames::new).collect(),
            checked: (0..cfg.n_layer).map(|_| AtomicBool::new(false)).collect(),
            served,
            lm_head: if cfg.tied_output {
                "token_embd.weight"
            } else {
                "output.weight"
            },
            cfg,
            source,
            pool,
        };
        model.check_tensors()?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Which layers this instance computes.
    pub fn serves(&self, layer: usize) -> bool {
        self.served.get(layer).copied().unwrap_or(false)
    }

    /// The layers this instance computes, ascending.
    pub fn served_layers(&self) -> Vec<usize> {
        (0..self.cfg.n_layer).filter(|&l| self.served[l]).collect()
    }

    /// Memory accounting of the weight files, when the source maps files under a budget.
    pub fn weight_stats(&self) -> Option<WeightStats> {
        self.source.weight_stats()
    }

    /// Keeps the weights of `layers` (served layers: those a plan runs here) loaded and unloads
    /// the other layers' files, where the weights are mapped on demand under a budget.
    pub fn retain_layers(&self, layers: &[usize]) -> CoreResult<()> {
        if let Some(&layer) = layers.iter().find(|&&l| l >= self.cfg.n_layer || !self.served[l]) {
            return Err(invalid(format!(
                "cannot keep layer {layer} loaded: this model instance serves layers {}",
                describe_layers(&self.served)
            )));
        }
        self.source.retain_layers(layers)
    }

    /// Runs `f` on this model's thread pool. Callers outside the pool should enter it once per
    /// call sequence: every matmul started from inside the pool skips the cross-thread wake-up
    /// that costs as much as a small decode matmul.
    /// With one thread the kernels already run on the caller, so there is nothing to enter.
    pub fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.pool.current_num_threads() == 1 {
            f()
        } else {
            self.pool.install(f)
        }
    }

    /// `f(start, chunk)` for chunks of `out` (`start`: the chunk's first index), over the pool
    /// when there is enough of it: a prefill's GELU or SiLU is a libm call per FFN value, and on
    /// the calling thread alone GPT-2's GELU held two threads' prefill to 1.5× one thread's.
    fn in_chunks(&self, out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
        const CHUNK: usize = 16 * 1024;
        if self.pool.current_num_threads() == 1 || out.len() < 2 * CHUNK {
            f(0, out);
            return;
        }
        self.pool.install(|| {
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(i, chunk)| f(i * CHUNK, chunk));
        });
    }

    /// Checks presence, shape and size of the embedding, the output tensors and, for a source
    /// that is entirely resident, of every served layer's tensors (a source that loads layers
    /// on demand has each layer checked on its first use, so opening maps no layer).
    fn check_tensors(&self) -> CoreResult<()> {
        let c = &self.cfg;
        let d = c.n_embd;
        self.matrix("token_embd.weight", c.n_vocab, d)?;
        self.check_vector("output_norm.weight", d)?;
        if c.arch.is_gpt2() {
            self.matrix("position_embd.weight", c.context_length, d)?;
            self.check_vector("output_norm.bias", d)?;
        }
        self.matrix(self.lm_head, c.n_vocab, d)?;
        if self.source.all_resident() {
            for layer in (0..c.n_layer).filter(|&l| self.served[l]) {
                self.check_layer_tensors(layer)?;
            }
        }
        Ok(())
    }

    fn check_layer_tensors(&self, layer: usize) -> CoreResult<()> {
        let c = &self.cfg;
        let (d, q) = (c.n_embd, c.n_head * c.head_dim);
        let names = &self.layers[layer];
        self.check_vector(&names.attn_norm, d)?;
        self.check_vector(&names.ffn_norm, d)?;
        self.projections(names)?;
        self.matrix(&names.attn_output, d, q)?;
        if c.arch.is_gpt2() {
            self.check_vector(&names.attn_norm_bias, d)?;
            self.check_vector(&names.ffn_norm_bias, d)?;
            self.check_vector(&names.ffn_up_bias, c.n_ff)?;
            self.check_vector(&names.ffn_down_bias, d)?;
        } else {
            self.matrix(&names.ffn_gate, c.n_ff, d)?;
        }
        self.matrix(&names.ffn_up, c.n_ff, d)?;
        self.matrix(&names.ffn_down, d, c.n_ff)?;
        self.head_extras(names)?;
        self.checked[layer].store(true, Ordering::Release);
        Ok(())
    }

    /// The layer's Q/K/V biases, Q/K norms and W_o bias, where its architecture has them.
    fn head_extras(&self, names: &LayerNames) -> CoreResult<HeadExtras> {
        let c = &self.cfg;
        let (q, kv, hd) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.head_dim);
        let when = |on: bool, name: &str, n: usize| on.then(|| self.vector(name, n)).transpose();
        let (separate_bias, norm, gpt2) = (c.arch.qkv_bias(), c.arch.qk_norm(), c.arch.is_gpt2());
        let (mut q_bias, mut k_bias, mut v_bias) = (
            when(separate_bias, &names.attn_q_bias, q)?,
            when(separate_bias, &names.attn_k_bias, kv)?,
            when(separate_bias, &names.attn_v_bias, kv)?,
        );
        if let Some(fused) = when(gpt2, &names.attn_qkv_bias, q + 2 * kv)? {
            (q_bias, k_bias, v_bias) = (
                Some(fused[..q].to_vec()),
                Some(fused[q..q + kv].to_vec()),
                Some(fused[q + kv..].to_vec()),
            );
        }
        Ok(HeadExtras {
            q_bias,
            k_bias,
            v_bias,
            q_norm: when(norm, &names.attn_q_norm, hd)?,
            k_norm: when(norm, &names.attn_k_norm, hd)?,
            o_bias: when(gpt2, &names.attn_output_bias, c.n_embd)?,
        })
    }

    /// The layer's Q, K, V projection matrices (GPT-2: three views of the fused one).
    fn projections(&self, names: &LayerNames) -> CoreResult<Projections> {
        let c = &self.cfg;
        let (d, q, kv) = (c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
        if c.arch.is_gpt2() {
            let fused = || self.matrix(&names.attn_qkv, q + 2 * kv, d);
            return Ok(Projections {
                q: fused()?,
                k: fused()?,
                v: fused()?,
                k_offset: q,
                v_offset: q + kv,
            });
        }
        Ok(Projections {
            q: self.matrix(&names.attn_q, q, d)?,
            k: self.matrix(&names.attn_k, kv, d)?,
            v: self.matrix(&names.attn_v, kv, d)?,
            k_offset: 0,
            v_offset: 0,
        })
    }

    /// RoPE in this architecture's pairing (none for GPT-2).
    fn rope(&self, v: &mut [f32], table: &[(f32, f32)]) {
        match self.cfg.arch.rope() {
            Rope::Adjacent => apply_rope(v, table),
            Rope::Halves => apply_rope_neox(v, table),
            Rope::None => {}
        }
    }

    fn lookup(&self, name: &str) -> CoreResult<TensorRef> {
        self.source
            .tensor(name)?
            .ok_or_else(|| file_error(&self.source.origin_of(name), format!("tensor {name} is missing")))
    }

    /// The weight `name` as a rows × cols matrix (GGUF dims `[cols, rows]`).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> CoreResult<Matrix> {
        let tensor = self.lookup(name)?;
        let t = tensor.view();
        if t.dims != [cols as u64, rows as u64] {
            return Err(file_error(
                &self.source.origin_of(name),
                format!("tensor {name} has dims {:?}, expected [{cols}, {rows}]", t.dims),
            ));
        }
        QMatrix::new(t.ty, rows, cols, t.data)
            .map_err(|e| file_error(&self.source.origin_of(name), format!("tensor {name}: {e}")))?;
        Ok(Matrix { tensor, rows, cols })
    }

    fn check_vector(&self, name: &str, n: usize) -> CoreResult<()> {
        self.vector(name, n).map(|_| ())
    }

    /// A 1-D weight (norm scales) as f32.
    fn vector(&self, name: &str, n: usize) -> CoreResult<Vec<f32>> {
        let t = self.lookup(name)?;
        let t = t.view();
        let n_stored: u64 = t.dims.iter().product();
        if n_stored != n as u64 || t.dims.iter().filter(|&&x| x != 1).count() > 1 {
            return Err(file_error(
                &self.source.origin_of(name),
                format!("tensor {name} has dims {:?}, expected [{n}]", t.dims),
            ));
        }
        let mut out = vec![0.0; n];
        dequantize_row(t.ty, t.data, &mut out)
            .map_err(|e| file_error(&self.source.origin_of(name), format!("tensor {name}: {e}")))?;
        Ok(out)
    }

    /// The layer's tensor names, after checking that this instance serves it and (once) that
    /// its tensors are all there with the right shapes.
    fn check_layer(&self, layer: usize) -> CoreResult<&LayerNames> {
        let names = self
            .layers
            .get(layer)
            .ok_or_else(|| invalid(format!("layer {layer} out of range (model has {})", self.cfg.n_layer)))?;
        if !self.served[layer] {
            return Err(invalid(format!(
                "layer {layer} is not served by this model instance (it serves layers {})",
                describe_layers(&self.served)
            )));
        }
        if !self.checked[layer].load(Ordering::Acquire) {
            self.check_layer_tensors(layer)?;
        }
        Ok(names)
    }

    fn tokens_of(&self, what: &str, len: usize, width: usize) -> CoreResult<usize> {
        if !len.is_multiple_of(width) {
            return Err(invalid(format!("{what}: length {len} is not a multiple of {width}")));
        }
        Ok(len / width)
    }

    /// Token embeddings: `out` is T × d. GPT-2 adds the learned embedding of each token's
    /// position, so it needs `positions` (one per token, below the context length); the other
    /// architectures ignore them (RoPE places tokens inside attention).
    pub fn embed(&self, tokens: &[u32], positions: Option<&[u32]>, out: &mut [f32]) -> CoreResult<()> {
        let d = self.cfg.n_embd;
        check_len("embed output", out.len(), tokens.len() * d)?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_vocab) {
            return Err(invalid(format!(
                "token id {t} out of range (vocabulary has {})",
                self.cfg.n_vocab
            )));
        }
        let m = self.matrix("token_embd.weight", self.cfg.n_vocab, d)?;
        let m = m.q();
        for (&t, o) in tokens.iter().zip(out.chunks_exact_mut(d)) {
            m.row(t as usize, o);
        }
        if !self.cfg.arch.is_gpt2() {
            return Ok(());
        }
        let Some(positions) = positions else {
            return Err(invalid(
                "this model adds learned position embeddings (gpt2): embed needs the tokens' positions",
            ));
        };
        check_len("embed positions", positions.len(), tokens.len())?;
        let n_ctx = self.cfg.context_length;
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= n_ctx) {
            return Err(invalid(format!(
                "position {p} is past the model's context length {n_ctx} (it has no embedding for it)"
            )));
        }
        let table = self.matrix("position_embd.weight", n_ctx, d)?;
        let table = table.q();
        let mut row = vec![0.0; d];
        for (&p, o) in positions.iter().zip(out.chunks_exact_mut(d)) {
            table.row(p as usize, &mut row);
            add_in_place(o, &row);
        }
        Ok(())
    }

    /// RMSNorm of T tokens (x is T × d) with the layer's attention-norm weight.
    pub fn attn_norm(&self, layer: usize, x: &[f32], out: &mut [f32]) -> CoreResult<()> {
        let names = self.check_layer(layer)?;
        self.norm(&names.attn_norm, &names.attn_norm_bias, x, out)
    }

    /// RMSNorm of T tokens (x is T × d) with the layer's FFN-norm weight.
    pub fn ffn_norm(&self, layer: usize, x: &[f32], out: &mut [f32]) -> CoreResult<()> {
        let names = self.check_layer(layer)?;
        self.norm(&names.ffn_norm, &names.ffn_norm_bias, x, out)
    }

    /// RMSNorm with `weight`, or for GPT-2 LayerNorm with `weight` and `bias`.
    fn norm(&self, weight: &str, bias: &str, x: &[f32], out: &mut [f32]) -> CoreResult<()> {
        let d = self.cfg.n_embd;
        self.tokens_of("norm input", x.len(), d)?;
        check_len("norm output", out.len(), x.len())?;
        let w = self.vector(weight, d)?;
        if self.cfg.arch.is_gpt2() {
            layer_norm(x, &w, &self.vector(bias, d)?, self.cfg.norm_eps, out);
        } else {
            rms_norm(x, &w, self.cfg.norm_eps, out);
        }
        Ok(())
    }

    /// Contribution of query heads `heads` of `layer` to the attention output, after their
    /// slice of W_o: `out` (T × d) is overwritten. Partials of disjoint head sets add up to the
    /// full attention output. K/V of the KV groups these heads read are computed from `x_norm`
    /// and appended to `session` at `positions` (T strictly increasing positions, after those
    /// already cached) — unless that group's cache already ends with exactly `positions`,
    /// which happens when another head subset of the same group ran this step; then they are
    /// reused. Queries attend causally to cached positions `<=` their own. No heads: `out` is
    /// zeroed and nothing is cached.
    pub fn attention(
        &self,
        session: &mut Session,
        layer: usize,
        heads: &[usize],
        x_norm: &[f32],
        positions: &[u32],
        out: &mut [f32],
    ) -> CoreResult<()> {
        self.check_layer(layer)?;
        session.check_matches(&self.cfg)?;
        let d = self.cfg.n_embd;
        check_positions(positions)?;
        check_len("attention input", x_norm.len(), positions.len() * d)?;
        check_len("attention output", out.len(), positions.len() * d)?;
        let mut sorted = heads.to_vec();
        sorted.sort_unstable();
        if let Some(&h) = sorted.iter().find(|&&h| h >= self.cfg.n_head) {
            return Err(invalid(format!(
                "head {h} out of range (model has {} query heads)",
                self.cfg.n_head
            )));
        }
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(format!("heads {heads:?} contain duplicates")));
        }
        self.attention_inner(session, layer, &sorted, x_norm, positions, out)
    }

    /// `heads` sorted, unique and in range; lengths checked.
    fn attention_inner(
        &self,
        session: &mut Session,
        layer: usize,
        heads: &[usize],
        x_norm: &[f32],
        positions: &[u32],
        out: &mut [f32],
    ) -> CoreResult<()> {
        if heads.is_empty() {
            out.fill(0.0);
            return Ok(());
        }
        let c = &self.cfg;
        let names = &self.layers[layer];
        let (hd, n_tok) = (c.head_dim, positions.len());
        let nq = c.n_head * hd;
        let proj = self.projections(names)?;
        let wo = self.matrix(&names.attn_output, c.n_embd, nq)?;
        let (wq, wk, wv, wo) = (proj.q.q(), proj.k.q(), proj.v.q(), wo.q());
        let (k_at, v_at) = (proj.k_offset, proj.v_offset);
        let extras = self.head_extras(names)?;

        let mut groups: Vec<usize> = heads.iter().map(|&h| c.kv_group_of_head(h)).collect();
        groups.dedup(); // heads are sorted, so groups are too
        let plans = groups
            .iter()
            .map(|&g| session.plan_append(layer, g, positions))
            .collect::<CoreResult<Vec<_>>>()?;
        let rope = rope_table(positions, hd, c.rope_theta);

        // K/V of the groups not cached yet.
        let mut k = vec![0.0; n_tok * hd];
        let mut v = vec![0.0; n_tok * hd];
        for (&g, plan) in groups.iter().zip(&plans) {
            if *plan == Append::Reuse {
                continue;
            }
            let rows = g * hd..(g + 1) * hd;
            wk.matmul_rows(k_at + rows.start..k_at + rows.end, x_norm, n_tok, &mut k, &self.pool);
            wv.matmul_rows(v_at + rows.start..v_at + rows.end, x_norm, n_tok, &mut v, &self.pool);
            if let (Some(kb), Some(vb)) = (&extras.k_bias, &extras.v_bias) {
                add_rows(&mut k, &kb[rows.clone()]);
                add_rows(&mut v, &vb[rows]);
            }
            for (kt, rt) in k.chunks_exact_mut(hd).zip(rope.chunks_exact(hd / 2)) {
                if let Some(w) = &extras.k_norm {
                    rms_norm_in_place(kt, w, c.norm_eps);
                }
                self.rope(kt, rt);
            }
            session.append(layer, g, positions, &k, &v);
        }

        // Q of the selected heads (one matmul per run of consecutive heads), laid out T × nq
        // with zeros in the other heads' columns.
        let mut q = vec![0.0; n_tok * nq];
        let mut run_start = 0;
        while run_start < heads.len() {
            let mut run_end = run_start + 1;
            while run_end < heads.len() && heads[run_end] == heads[run_end - 1] + 1 {
                run_end += 1;
            }
            let rows = heads[run_start] * hd..(heads[run_end - 1] + 1) * hd;
            let mut qr = vec![0.0; n_tok * rows.len()];
            wq.matmul_rows(rows.clone(), x_norm, n_tok, &mut qr, &self.pool);
            if let Some(qb) = &extras.q_bias {
                add_rows(&mut qr, &qb[rows.clone()]);
            }
            for (t, src) in qr.chunks_exact(rows.len()).enumerate() {
                q[t * nq + rows.start..t * nq + rows.end].copy_from_slice(src);
            }
            run_start = run_end;
        }

        // Per (token, selected head): RoPE on the query, causal softmax attention over the cache.
        let caches: Vec<_> = (0..c.n_head_kv).map(|g| session.cache(layer, g)).collect();
        let mut selected = vec![false; c.n_head];
        heads.iter().for_each(|&h| selected[h] = true);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0.0f32; n_tok * nq];
        self.pool.install(|| {
            attn.par_chunks_mut(hd)
                .zip(q.par_chunks_mut(hd))
                .enumerate()
                .filter(|(i, _)| selected[i % c.n_head])
                .for_each(|(i, (ah, qh))| {
                    let (t, h) = (i / c.n_head, i % c.n_head);
                    let cache = caches[c.kv_group_of_head(h)].expect("group computed above");
                    if let Some(w) = &extras.q_norm {
                        rms_norm_in_place(qh, w, c.norm_eps);
                    }
                    self.rope(qh, &rope[t * hd / 2..(t + 1) * hd / 2]);
                    let n_vis = cache.pos.partition_point(|&p| p <= positions[t]);
                    let mut scores: Vec<f32> = cache.k[..n_vis * hd]
                        .chunks_exact(hd)
                        .map(|kj| dot(qh, kj) * scale)
                        .collect();
                    softmax(&mut scores);
                    for (&p, vj) in scores.iter().zip(cache.v.chunks_exact(hd)) {
                        for (o, &vv) in ah.iter_mut().zip(vj) {
                            *o += p * vv;
                        }
                    }
                });
        });
        self.output_projection(&wo, heads, &attn, n_tok, out)?;
        if let (Some(bias), Some(0)) = (&extras.o_bias, heads.first()) {
            add_rows(out, bias); // once over any partition of the heads: with head 0
        }
        Ok(())
    }

    /// `out = W_o · attn` where `attn` (T × n_head·head_dim) is zero outside `heads`. For a
    /// strict subset of heads whose column blocks align with the weight's quantization blocks,
    /// only those columns of W_o are gathered and multiplied (same block dot products, minus
    /// exact zeros); otherwise the whole W_o multiplies the zero-padded input.
    fn output_projection(
        &self,
        wo: &QMatrix<'_>,
        heads: &[usize],
        attn: &[f32],
        n_tok: usize,
        out: &mut [f32],
    ) -> CoreResult<()> {
        let (hd, nq) = (self.cfg.head_dim, self.cfg.n_head * self.cfg.head_dim);
        let (bl, bb) = (wo.ty.block_len(), wo.ty.block_bytes());
        if heads.len() == self.cfg.n_head || hd % bl != 0 {
            wo.matmul(attn, n_tok, out, &self.pool);
            return Ok(());
        }
        let cols = heads.len() * hd;
        let (head_bytes, row_bytes) = (hd / bl * bb, nq / bl * bb);
        let mut w = Vec::with_capacity(wo.rows * heads.len() * head_bytes);
        for r in 0..wo.rows {
            let row = &wo.data[r * row_bytes..(r + 1) * row_bytes];
            for &h in heads {
                w.extend_from_slice(&row[h * head_bytes..(h + 1) * head_bytes]);
            }
        }
        let mut x = Vec::with_capacity(n_tok * cols);
        for a_t in attn.chunks_exact(nq) {
            for &h in heads {
                x.extend_from_slice(&a_t[h * hd..(h + 1) * hd]);
            }
        }
        QMatrix::new(wo.ty, wo.rows, cols, &w)?.matmul(&x, n_tok, out, &self.pool);
        Ok(())
    }

    /// One SwiGLU FFN part of `layer` on `n_tokens` tokens (see [`FfnPart`] for shapes).
    pub fn ffn(&self, layer: usize, part: FfnPart, input: &[f32], n_tokens: usize, out: &mut [f32]) -> CoreResult<()> {
        self.check_layer(layer)?;
        let (d, f) = (self.cfg.n_embd, self.cfg.n_ff);
        let (in_w, out_w) = match part {
            FfnPart::Full => (d, d),
            FfnPart::GateUp => (d, f),
            FfnPart::Down => (f, d),
        };
        check_len("ffn input", input.len(), n_tokens * in_w)?;
        check_len("ffn output", out.len(), n_tokens * out_w)?;
        match part {
            FfnPart::Full => self.ffn_full(layer, input, n_tokens, out),
            FfnPart::GateUp => self.ffn_gate_up(layer, input, n_tokens, out),
            FfnPart::Down => self.ffn_down(layer, input, n_tokens, out),
        }
    }

    fn ffn_full(&self, layer: usize, x: &[f32], n_tok: usize, out: &mut [f32]) -> CoreResult<()> {
        let mut hidden = vec![0.0; n_tok * self.cfg.n_ff];
        self.ffn_gate_up(layer, x, n_tok, &mut hidden)?;
        self.ffn_down(layer, &hidden, n_tok, out)
    }

    fn ffn_gate_up(&self, layer: usize, x: &[f32], n_tok: usize, out: &mut [f32]) -> CoreResult<()> {
        let (d, f) = (self.cfg.n_embd, self.cfg.n_ff);
        let names = &self.layers[layer];
        if self.cfg.arch.is_gpt2() {
            // GPT-2's first map: gelu(W1·x + b1).
            self.matrix(&names.ffn_up, f, d)?.q().matmul(x, n_tok, out, &self.pool);
            add_rows(out, &self.vector(&names.ffn_up_bias, f)?);
            self.in_chunks(out, |_, chunk| chunk.iter_mut().for_each(|v| *v = gelu(*v)));
            return Ok(());
        }
        let gate = self.matrix(&names.ffn_gate, f, d)?;
        let up = self.matrix(&names.ffn_up, f, d)?;
        let (gate, up) = (gate.q(), up.q());
        let mut u = vec![0.0; n_tok * f];
        gate.matmul(x, n_tok, out, &self.pool);
        up.matmul(x, n_tok, &mut u, &self.pool);
        self.in_chunks(out, |start, chunk| {
            for (g, &u) in chunk.iter_mut().zip(&u[start..]) {
                *g = silu(*g) * u;
            }
        });
        Ok(())
    }

    fn ffn_down(&self, layer: usize, h: &[f32], n_tok: usize, out: &mut [f32]) -> CoreResult<()> {
        let (d, f) = (self.cfg.n_embd, self.cfg.n_ff);
        let down = self.matrix(&self.layers[layer].ffn_down, d, f)?;
        down.q().matmul(h, n_tok, out, &self.pool);
        if self.cfg.arch.is_gpt2() {
            add_rows(out, &self.vector(&self.layers[layer].ffn_down_bias, d)?);
        }
        Ok(())
    }

    /// Final RMSNorm and LM head: x (T × d) -> logits (T × vocab).
    pub fn output_logits(&self, x: &[f32], n_tokens: usize, out: &mut [f32]) -> CoreResult<()> {
        let (d, nv) = (self.cfg.n_embd, self.cfg.n_vocab);
        check_len("output_logits input", x.len(), n_tokens * d)?;
        check_len("output_logits output", out.len(), n_tokens * nv)?;
        let mut xn = vec![0.0; x.len()];
        self.norm("output_norm.weight", "output_norm.bias", x, &mut xn)?;
        let head = self.matrix(self.lm_head, nv, d)?;
        head.q().matmul(&xn, n_tokens, out, &self.pool);
        Ok(())
    }

    /// One whole layer in place on x (T × d) for the all-local case: attn_norm, all heads,
    /// residual add, ffn_norm, FFN, residual add. Same helpers and order as the sub-block
    /// calls.
    pub fn layer_fused(&self, session: &mut Session, layer: usize, x: &mut [f32], positions: &[u32]) -> CoreResult<()> {
        let names = self.check_layer(layer)?;
        session.check_matches(&self.cfg)?;
        check_positions(positions)?;
        let d = self.cfg.n_embd;
        let n_tok = positions.len();
        check_len("layer input", x.len(), n_tok * d)?;
        let all_heads: Vec<usize> = (0..self.cfg.n_head).collect();
        let mut xn = vec![0.0; x.len()];
        let mut delta = vec![0.0; x.len()];
        self.norm(&names.attn_norm, &names.attn_norm_bias, x, &mut xn)?;
        self.attention_inner(session, layer, &all_heads, &xn, positions, &mut delta)?;
        add_in_place(x, &delta);
        self.norm(&names.ffn_norm, &names.ffn_norm_bias, x, &mut xn)?;
        self.ffn_full(layer, &xn, n_tok, &mut delta)?;
        add_in_place(x, &delta);
        Ok(())
    }

    /// Whole forward: `tokens` at `positions` through every layer; returns the logits of the
    /// last token (vocab values), or of every token (T × vocab) if `all_logits`.
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        positions: &[u32],
        all_logits: bool,
    ) -> CoreResult<Vec<f32>> {
        if tokens.len() != positions.len() {
            return Err(invalid(format!(
                "{} tokens but {} positions",
                tokens.len(),
                positions.len()
            )));
        }
        check_positions(positions)?;
        let d = self.cfg.n_embd;
        let mut x = vec![0.0; tokens.len() * d];
        self.embed(tokens, Some(positions), &mut x)?;
        for layer in 0..self.cfg.n_layer {
            self.layer_fused(session, layer, &mut x, positions)?;
        }
        let rows = if all_logits { &x[..] } else { &x[x.len() - d..] };
        let n = rows.len() / d;
        let mut logits = vec![0.0; n * self.cfg.n_vocab];
        self.output_logits(rows, n, &mut logits)?;
        Ok(logits)
    }
}

/// Per-layer flags from an optional list of layers (all when `None`).
fn served_mask(n_layer: usize, layers: Option<&[usize]>) -> CoreResult<Vec<bool>> {
    let Some(layers) = layers else {
        return Ok(vec![true; n_layer]);
    };
    let mut mask = vec![false; n_layer];
    for &l in layers {
        if l >= n_layer {
            return Err(invalid(format!(
                "cannot serve layer {l}: the model has {n_layer} layers (0..{n_layer})"
            )));
        }
        mask[l] = true;
    }
    Ok(mask)
}

/// "0-9, 20" for a mask, for error messages.
pub(crate) fn describe_layers(mask: &[bool]) -> String {
    let mut parts = Vec::new();
    let mut l = 0;
    while l < mask.len() {
        if !mask[l] {
            l += 1;
            continue;
        }
        let start = l;
        while l + 1 < mask.len() && mask[l + 1] {
            l += 1;
        }
        parts.push(if start == l {
            format!("{l}")
        } else {
            format!("{start}-{l}")
        });
        l += 1;
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

fn check_len(what: &str, actual: usize, expected: usize) -> CoreResult<()> {
    if actual != expected {
        return Err(invalid(format!("{what}: length {actual}, expected {expected}")));
    }
    Ok(())
}

fn check_positions(positions: &[u32]) -> CoreResult<()> {
    if positions.is_empty() {
        return Err(invalid("no positions given"));
    }
    if positions.windows(2).any(|w| w[1] <= w[0]) {
        return Err(invalid(format!(
            "positions must be strictly increasing, got {positions:?}"
        )));
    }
    Ok(())
}

fn add_in_place(x: &mut [f32], d: &[f32]) {
    x.iter_mut().zip(d).for_each(|(a, b)| *a += b);
}

/// Adds `bias` to every row of `x` (rows of `bias.len()`).
fn add_rows(x: &mut [f32], bias: &[f32]) {
    x.chunks_exact_mut(bias.len()).for_each(|row| add_in_place(row, bias));
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (GPT-2's, and ggml's `ggml_gelu`).
fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

fn softmax(s: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|v| *v *= inv);
}

/// RMSNorm of each row of length `w.len()`: `x / sqrt(mean(x²) + eps) * w` (sum in f64 as
/// ggml does).
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = 1.0 / ((ss / d as f64) as f32 + eps).sqrt();
        for ((o, &v), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * wi;
        }
    }
}

/// LayerNorm of each row of length `w.len()`: `(x − mean) / sqrt(var + eps) * w + b` (sums in f64
/// as ggml's `ggml_norm` does).
pub(crate) fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = (xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64) as f32;
        let var = (xr.iter().map(|&v| ((v - mean) * (v - mean)) as f64).sum::<f64>() / d as f64) as f32;
        let scale = 1.0 / (var + eps).sqrt();
        for (((o, &v), &wi), &bi) in or.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (v - mean) * scale * wi + bi;
        }
    }
}

/// (cos, sin) for every token and pair i: angle `pos · theta^(-2i/head_dim)`; T × head_dim/2.
pub(crate) fn rope_table(positions: &[u32], head_dim: usize, theta: f32) -> Vec<(f32, f32)> {
    let half = head_dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (theta as f64).powf(-2.0 * i as f64 / head_dim as f64))
        .collect();
    positions
        .iter()
        .flat_map(|&p| {
            freqs.iter().map(move |&f| {
                let (s, c) = (p as f64 * f).sin_cos();
                (c as f32, s as f32)
            })
        })
        .collect()
}

/// RMSNorm of one row in place (a query or key head of Qwen3).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let row = x.to_vec();
    rms_norm(&row, w, eps, x);
}

/// Rotates pairs `(i, i + head_dim/2)` of one head by the table row (llama.cpp "NEOX" RoPE).
pub(crate) fn apply_rope_neox(v: &mut [f32], table: &[(f32, f32)]) {
    let (first, second) = v.split_at_mut(v.len() / 2);
    for ((x0, x1), &(c, s)) in first.iter_mut().zip(second.iter_mut()).zip(table) {
        let (a, b) = (*x0, *x1);
        *x0 = a * c - b * s;
        *x1 = a * s + b * c;
    }
}

/// Rotates pairs `(2i, 2i+1)` of one head by the table row (llama.cpp "normal" RoPE).
pub(crate) fn apply_rope(v: &mut [f32], table: &[(f32, f32)]) {
    for (pair, &(c, s)) in v.chunks_exact_mut(2).zip(table) {
        let (x0, x1) = (pair[0], pair[1]);
        pair[0] = x0 * c - x1 * s;
        pair[1] = x0 * s + x1 * c;
    }
}
