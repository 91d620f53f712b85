//! Shard writer, multi-file loader and its LRU on tiny synthetic models.

use super::*;
use crate::engine::gguf::{GgufWriter, MetaValue};
use crate::engine::model::tests::{tiny_config, tiny_gguf, tiny_source};
use crate::engine::model::Session;

const N_LAYER: usize = 6;
const TOKENS: [u32; 4] = [3, 17, 4, 40];

/// A fresh empty directory, unique per test and process.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splitwise-files-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A 6-layer tiny llama GGUF in `dir` (plus a tokenizer key, to see where it ends up).
fn tiny_model_file(dir: &Path, seed: u64) -> PathBuf {
    let mut cfg = tiny_config(6, 2, false);
    cfg.n_layer = N_LAYER;
    let src = tiny_source(&cfg, seed);
    let plain = tiny_gguf(
        "llama",
        &cfg,
        &src,
        &format!("files-{seed}-{}", dir.display().to_string().len()),
    );
    let path = dir.join("model.gguf");
    rewrite(
        &plain,
        &path,
        &[("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))],
        |_| true,
    );
    std::fs::remove_file(&plain).unwrap();
    path
}

/// Copies `from` to `to` with extra metadata and only the tensors `keep` selects.
fn rewrite(from: &Path, to: &Path, extra: &[(&str, MetaValue)], keep: impl Fn(&str) -> bool) {
    let file = GgufFile::open(from).unwrap();
    let mut w = GgufWriter::new();
    for key in file.metadata_keys() {
        w.add_metadata(key, file.metadata(key).unwrap().clone()).unwrap();
    }
    for (key, value) in extra {
        w.add_metadata(*key, value.clone()).unwrap();
    }
    for t in file.tensors().iter().filter(|t| keep(&t.name)) {
        w.add_tensor(t.name.as_str(), &t.dims, t.ty, file.tensor_data(t))
            .unwrap();
    }
    w.write(to).unwrap();
}

fn shard(model: &Path, dir: &Path) -> ShardSummary {
    let mut seen = Vec::new();
    let summary = write_shards(model, dir, &mut |s| {
        seen.push(s.path.clone());
        true
    })
    .unwrap();
    assert_eq!(seen.len(), N_LAYER + 1, "progress is reported once per file");
    summary
}

fn logits(model: &Model) -> Vec<f32> {
    let positions: Vec<u32> = (0..TOKENS.len() as u32).collect();
    let mut session = Session::new(model.config());
    model.forward(&mut session, &TOKENS, &positions, true).unwrap()
}

fn expect_file_error(result: CoreResult<impl std::fmt::Debug>, path_ends: &str, problem_has: &str) {
    match result {
        Err(CoreError::ModelFile { path, problem }) => {
            assert!(path.ends_with(path_ends), "error names {path}, expected …{path_ends}");
            assert!(
                problem.contains(problem_has),
                "problem {problem:?} should mention {problem_has:?}"
            );
        }
        other => panic!("expected a ModelFile error about {path_ends}, got {other:?}"),
    }
}

#[test]
fn shards_are_tagged_gguf_files_and_compute_identical_logits() {
    let dir = temp_dir("roundtrip");
    let model = tiny_model_file(&dir, 5);
    let out = dir.join("shards");
    std::fs::create_dir(&out).unwrap();
    let summary = shard(&model, &out);
    assert_eq!(summary.n_layer, N_LAYER);
    assert_eq!(summary.source_sha256.len(), 64);
    assert_eq!(summary.shards[0].path, out.join(BASE_FILE));

    let base = GgufFile::open(&out.join(BASE_FILE)).unwrap();
    assert_eq!(base.meta_str(KEY_ROLE).unwrap(), ROLE_BASE);
    assert_eq!(base.meta_str(KEY_SOURCE_SHA256).unwrap(), summary.source_sha256);
    assert_eq!(base.meta_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(base.tensor("token_embd.weight").is_some() && base.tensor("output.weight").is_some());
    assert!(base.tensors().iter().all(|t| layer_of_tensor(&t.name).is_none()));
    let source = GgufFile::open(&model).unwrap();
    for l in 0..N_LAYER {
        let shard = GgufFile::open(&out.join(layer_file_name(l))).unwrap();
        assert_eq!(shard.meta_u32(KEY_LAYER).unwrap() as usize, l);
        assert_eq!(shard.meta_u32(KEY_N_LAYER).unwrap() as usize, N_LAYER);
        assert_eq!(shard.meta_u32("llama.block_count").unwrap() as usize, N_LAYER);
        assert!(shard.metadata("tokenizer.ggml.model").is_none());
        assert_eq!(shard.tensors().len(), 9);
        for t in shard.tensors() {
            assert_eq!(layer_of_tensor(&t.name), Some(l));
            let original = source.tensor(&t.name).unwrap();
            assert_eq!(
                shard.tensor_data(t),
                source.tensor_data(original),
                "{} copied byte for byte",
                t.name
            );
        }
    }

    let plain = logits(&open_model(&model, 1, None, None).unwrap());
    let sharded = open_model(&out, 1, None, None).unwrap();
    assert_eq!(logits(&sharded), plain);
    let stats = sharded.weight_stats().unwrap();
    assert_eq!(
        (stats.files, stats.mapped_files, stats.loads),
        (N_LAYER + 1, N_LAYER + 1, 0)
    );
    // The base file opens the directory too.
    assert_eq!(logits(&open_model(&out.join(BASE_FILE), 1, None, None).unwrap()), plain);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Which layer files are mapped right now.
fn mapped_layers(files: &ModelFiles) -> Vec<usize> {
    let state = files.lock();
    (0..files.slots.len())
        .filter(|&i| state.mapped[i].is_some())
        .filter_map(|i| match files.slots[i].identity {
            Identity::Shard { layer, .. } => layer,
            _ => None,
        })
        .collect()
}

#[test]
fn lru_evicts_the_least_recently_used_layer_and_stays_within_the_budget() {
    let dir = temp_dir("lru");
    let model = tiny_model_file(&dir, 6);
    shard(&model, &dir);
    let layer_bytes = file_bytes(&dir.join(layer_file_name(0)));
    assert!((0..N_LAYER).all(|l| file_bytes(&dir.join(layer_file_name(l))) == layer_bytes));
    let budget = file_bytes(&dir.join(BASE_FILE)) + 2 * layer_bytes;
    let files = ModelFiles::open(&dir, None, Some(budget)).unwrap();
    assert!(!files.all_resident());
    assert_eq!(
        mapped_layers(&files),
        Vec::<usize>::new(),
        "a budget maps no layer at the open"
    );

    let touch = |l: usize| {
        files.tensor(&format!("blk.{l}.attn_q.weight")).unwrap().unwrap();
        let stats = files.weight_stats().unwrap();
        assert!(
            stats.mapped_bytes <= budget && stats.peak_mapped_bytes <= budget,
            "{stats:?}"
        );
    };
    touch(0);
    touch(1);
    assert_eq!(mapped_layers(&files), [0, 1]);
    touch(2);
    assert_eq!(mapped_layers(&files), [1, 2], "layer 0 was least recently used");
    touch(1);
    touch(3);
    assert_eq!(mapped_layers(&files), [1, 3], "layer 1 was used after layer 2");
    touch(0);
    assert_eq!(mapped_layers(&files), [0, 3]);
    let stats = files.weight_stats().unwrap();
    assert_eq!((stats.loads, stats.evictions), (5, 3));
    assert_eq!(stats.mapped_files, 3);

    // A tensor handed out before its file was evicted keeps its bytes.
    let held = files.tensor("blk.0.ffn_down.weight").unwrap().unwrap();
    let copy = held.view().data.to_vec();
    touch(4);
    touch(5);
    assert!(!mapped_layers(&files).contains(&0));
    assert_eq!(held.view().data, &copy[..]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn retained_layers_follow_the_plan_and_are_evicted_last() {
    let dir = temp_dir("retain");
    let model = tiny_model_file(&dir, 8);
    shard(&model, &dir);
    let base = file_bytes(&dir.join(BASE_FILE));
    let layer_bytes = file_bytes(&dir.join(layer_file_name(0)));
    let files = ModelFiles::open(&dir, None, Some(base + 3 * layer_bytes)).unwrap();
    let touch = |l: usize| {
        files.tensor(&format!("blk.{l}.attn_q.weight")).unwrap().unwrap();
    };
    touch(4);
    files.retain_layers(&[0, 1]).unwrap();
    assert_eq!(mapped_layers(&files), [0, 1], "loaded ahead; layer 4 unmapped");
    let stats = files.weight_stats().unwrap();
    assert_eq!((stats.loads, stats.evictions), (3, 1));

    // Running the plan's layers loads nothing more, however often.
    for _ in 0..5 {
        touch(0);
        touch(1);
    }
    assert_eq!(files.weight_stats().unwrap().loads, 3);

    // Another layer (a fallback) takes the free room, then evicts itself, not the plan's.
    touch(2);
    touch(3);
    assert_eq!(mapped_layers(&files), [0, 1, 3]);
    let stats = files.weight_stats().unwrap();
    assert_eq!((stats.loads, stats.evictions), (5, 2));

    // A new plan: its layers are loaded, the others unmapped.
    files.retain_layers(&[1, 5]).unwrap();
    assert_eq!(mapped_layers(&files), [1, 5]);

    // More than the budget holds: refused, nothing changed.
    let err = files.retain_layers(&[0, 1, 2, 3]).unwrap_err();
    assert!(
        matches!(&err, CoreError::InvalidArgument(m) if m.contains("0-3") && m.contains("memory budget")),
        "{err}"
    );
    assert_eq!(mapped_layers(&files), [1, 5]);
    let err = files.retain_layers(&[N_LAYER]).unwrap_err();
    assert!(matches!(err, CoreError::InvalidArgument(_)), "{err}");

    // Without a budget everything stays mapped and retaining changes nothing.
    let unbounded = ModelFiles::open(&dir, None, None).unwrap();
    unbounded.retain_layers(&[0]).unwrap();
    assert_eq!(mapped_layers(&unbounded), (0..N_LAYER).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tight_budget_reloads_on_demand_with_identical_logits() {
    let dir = temp_dir("tight");
    let model = tiny_model_file(&dir, 7);
    shard(&model, &dir);
    let plain = logits(&open_model(&model, 1, None, None).unwrap());
    let base = file_bytes(&dir.join(BASE_FILE));
    let layer = file_bytes(&dir.join(layer_file_name(0)));
    for held_layers in [1, 3] {
        let m = open_model(&dir, 1, None, Some(base + held_layers * layer)).unwrap();
        for _ in 0..2 {
            assert_eq!(logits(&m), plain, "budget of {held_layers} layers");
        }
        let stats = m.weight_stats().unwrap();
        assert!(stats.evictions > 0 && stats.loads > N_LAYER as u64, "{stats:?}");
        assert!(stats.peak_mapped_bytes <= base + held_layers * layer);
    }
    let err = open_model(&dir, 1, None, Some(base + layer - 1)).unwrap_err();
    assert!(
        matches!(&err, CoreError::InvalidArgument(m) if m.contains("cannot hold") && m.contains("layer-")),
        "{err}"
    );
    let err = open_model(&model, 1, None, Some(file_bytes(&model) - 1)).unwrap_err();
    assert!(
        matches!(&err, CoreError::InvalidArgument(m) if m.contains("shard it")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_partial_model_serves_only_its_layers() {
    let dir = temp_dir("partial");
    let model = tiny_model_file(&dir, 8);
    shard(&model, &dir);
    std::fs::remove_file(dir.join(layer_file_name(5))).unwrap();
    let full = open_model(&model, 1, None, None).unwrap();
    let part = open_model(&dir, 1, Some(&[1, 2]), None).unwrap();
    assert_eq!(part.served_layers(), [1, 2]);
    assert_eq!(part.weight_stats().unwrap().files, 3);
    let d = full.config().n_embd;
    let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    full.ffn(2, crate::engine::model::FfnPart::Full, &x, 2, &mut a).unwrap();
    part.ffn(2, crate::engine::model::FfnPart::Full, &x, 2, &mut b).unwrap();
    assert_eq!(a, b);
    let err = part
        .ffn(4, crate::engine::model::FfnPart::Full, &x, 2, &mut b)
        .unwrap_err();
    assert!(
        matches!(&err, CoreError::InvalidArgument(m) if m.contains("layer 4 is not served") && m.contains("1-2")),
        "{err}"
    );
    let err = open_model(&dir, 1, Some(&[0, N_LAYER]), None).unwrap_err();
    assert!(
        matches!(&err, CoreError::InvalidArgument(m) if m.contains("cannot serve layer 6")),
        "{err}"
    );
    // The whole model needs the removed layer.
    expect_file_error(
        open_model(&dir, 1, None, None),
        &dir.display().to_string(),
        "layer 5 has no shard",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shards_of_another_model_or_of_the_wrong_layer_are_rejected() {
    let dir = temp_dir("mismatch");
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    shard(&tiny_model_file(&a, 9), &a);
    shard(&tiny_model_file(&b, 10), &b);
    std::fs::copy(b.join(layer_file_name(3)), a.join(layer_file_name(3))).unwrap();
    expect_file_error(
        open_model(&a, 1, None, None),
        "a/layer-003.gguf",
        "shard of another model",
    );
    // Layers that do not include the foreign shard still open.
    assert!(open_model(&a, 1, Some(&[0, 1, 2]), None).is_ok());

    std::fs::copy(a.join(layer_file_name(2)), a.join(layer_file_name(3))).unwrap();
    expect_file_error(
        open_model(&a, 1, None, None),
        "a/layer-003.gguf",
        "holds layer 2 but should hold layer 3",
    );

    // A shard replaced while the model runs under a budget is caught when it is mapped again.
    std::fs::copy(b.join(layer_file_name(3)), a.join(layer_file_name(3))).unwrap();
    std::fs::copy(a.join(layer_file_name(4)), dir.join("good-4.gguf")).unwrap();
    let base = file_bytes(&a.join(BASE_FILE));
    let layer = file_bytes(&a.join(layer_file_name(0)));
    let m = open_model(&a, 1, Some(&[4]), Some(base + layer)).unwrap();
    std::fs::copy(b.join(layer_file_name(4)), a.join(layer_file_name(4))).unwrap();
    let d = m.config().n_embd;
    let mut out = vec![0.0; d];
    let err = m.ffn_norm(4, &vec![1.0; d], &mut out).unwrap_err();
    assert!(
        err.to_string().contains("layer-004.gguf") && err.to_string().contains("another model"),
        "{err}"
    );

    // A layer shard alone, or a shard given as the source to shard again.
    expect_file_error(
        open_model(&a.join(layer_file_name(0)), 1, None, None),
        "layer-000.gguf",
        "open its directory",
    );
    expect_file_error(
        write_shards(&a.join(BASE_FILE), &dir, &mut |_| true),
        "base.gguf",
        "already a shard",
    );
    std::fs::remove_file(a.join(BASE_FILE)).unwrap();
    expect_file_error(open_model(&a, 1, None, None), "a", "base.gguf is missing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `model` as a gguf-split set of `count` files the way llama.cpp's gguf-split does:
/// all metadata in the first file, tensors spread in order, `split.*` keys in every file.
fn write_split(model: &Path, dir: &Path, count: u16) -> Vec<PathBuf> {
    let file = GgufFile::open(model).unwrap();
    let tensors = file.tensors();
    let per = tensors.len().div_ceil(count as usize);
    (0..count)
        .map(|i| {
            let path = dir.join(format!("tiny-{:05}-of-{count:05}.gguf", i + 1));
            let mut w = GgufWriter::new();
            if i == 0 {
                for key in file.metadata_keys() {
                    w.add_metadata(key, file.metadata(key).unwrap().clone()).unwrap();
                }
            }
            w.add_metadata("split.no", MetaValue::U16(i)).unwrap();
            w.add_metadata("split.count", MetaValue::U16(count)).unwrap();
            w.add_metadata("split.tensors.count", MetaValue::I32(tensors.len() as i32))
                .unwrap();
            for t in tensors.iter().skip(i as usize * per).take(per) {
                w.add_tensor(t.name.as_str(), &t.dims, t.ty, file.tensor_data(t))
                    .unwrap();
            }
            w.write(&path).unwrap();
            path
        })
        .collect()
}

#[test]
fn gguf_split_sets_are_merged() {
    let dir = temp_dir("split");
    let model = tiny_model_file(&dir, 11);
    let plain = logits(&open_model(&model, 1, None, None).unwrap());
    let parts = write_split(&model, &dir, 3);
    let files = ModelFiles::open(&parts[0], None, None).unwrap();
    assert_eq!(files.layout(), Layout::Split);
    assert_eq!(files.locations.len(), 3 + 9 * N_LAYER);
    let m = open_model(&parts[0], 1, None, None).unwrap();
    assert_eq!(logits(&m), plain);
    // The output tensors sit in the first split only; the others can be evicted.
    let last = file_bytes(&parts[2]).max(file_bytes(&parts[1]));
    let m = open_model(&parts[0], 1, None, Some(file_bytes(&parts[0]) + last)).unwrap();
    assert_eq!(logits(&m), plain);
    assert!(m.weight_stats().unwrap().evictions > 0);

    // Shards cut from a split set equal those cut from the plain file, tensor by tensor.
    let out = dir.join("shards");
    std::fs::create_dir(&out).unwrap();
    shard(&parts[0], &out);
    assert_eq!(logits(&open_model(&out, 1, None, None).unwrap()), plain);
    let base = GgufFile::open(&out.join(BASE_FILE)).unwrap();
    assert!(base.metadata("split.count").is_none(), "a shard is a whole file");

    expect_file_error(
        open_model(&parts[1], 1, None, None),
        "tiny-00002-of-00003.gguf",
        "open the first file",
    );
    std::fs::remove_file(&parts[2]).unwrap();
    expect_file_error(
        open_model(&parts[0], 1, None, None),
        "tiny-00003-of-00003.gguf",
        "split 3 of 3 is missing",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
