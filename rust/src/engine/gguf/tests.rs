//! GGUF reader and writer: the bundled SmolLM2 file, a writer-made sample read back, corrupted copies of it.

use super::*;
use crate::engine::kernels::QMatrix;

/// The bundled SmolLM2 file, named by `SPLITWISE_TEST_GGUF` (scripts/test sets it). Without it
/// the test says it is skipped — except under CI, where a missing model is a broken setup.
fn real_model_path() -> Option<PathBuf> {
    match std::env::var_os("SPLITWISE_TEST_GGUF").map(PathBuf::from) {
        Some(path) => {
            assert!(path.is_file(), "SPLITWISE_TEST_GGUF={} is not a file", path.display());
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("SPLITWISE_TEST_GGUF is not set under CI: scripts/test names the bundled SmolLM2 file")
        }
        None => {
            eprintln!("SKIPPED: SPLITWISE_TEST_GGUF is not set (scripts/test sets it to the bundled SmolLM2 file)");
            None
        }
    }
}

/// A fresh path in the system temp dir, unique per test and process.
fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("splitwise-gguf-{}-{name}.gguf", std::process::id()))
}

fn expect_model_file_error(path: &Path, problem_contains: &str) {
    match GgufFile::open(path) {
        Err(CoreError::ModelFile {
            path: err_path,
            problem,
        }) => {
            assert_eq!(err_path, path.display().to_string());
            assert!(
                problem.contains(problem_contains),
                "problem {problem:?} should mention {problem_contains:?}"
            );
            let err = GgufFile::open(path).unwrap_err();
            assert_eq!(err.class_name(), "ModelFileError");
            assert!(err.to_string().contains(&path.display().to_string()));
        }
        Err(other) => panic!("expected ModelFile error, got {other:?}"),
        Ok(_) => panic!("{} opened but should not", path.display()),
    }
}

#[test]
fn opens_the_real_smollm2_file() {
    let Some(path) = real_model_path() else {
        return;
    };
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.path(), path.as_path());
    assert_eq!(file.meta_str("general.architecture").unwrap(), "llama");
    assert_eq!(file.meta_u32("llama.block_count").unwrap(), 30);
    assert_eq!(file.meta_u32("llama.embedding_length").unwrap(), 576);
    assert!(file.meta_f32("llama.attention.layer_norm_rms_epsilon").unwrap() > 0.0);
    let tokens = file.metadata("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(tokens.len(), 49152);
    assert!(file.metadata_keys().any(|k| k == "tokenizer.ggml.model"));

    let q = file.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.dims.as_slice(), q.ty), (&[576u64, 576][..], GgmlType::Q4_1));
    let embedding = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embedding.dims, [576, 49152]);
    assert_eq!(embedding.ty, GgmlType::Q8_0);
    let norm = file.tensor("blk.29.ffn_norm.weight").unwrap();
    assert_eq!((norm.dims.as_slice(), norm.ty), (&[576u64][..], GgmlType::F32));
    assert_eq!(
        file.tensors().iter().filter(|t| t.name.starts_with("blk.")).count(),
        30 * 9
    );

    for info in file.tensors() {
        let data = file.tensor_data(info);
        assert_eq!(data.len(), info.size);
        let rows = info.n_rows() as usize;
        QMatrix::new(info.ty, rows, info.dims[0] as usize, data).unwrap();
    }
    // A dequantized embedding row must look like an embedding: finite, not all zero.
    let matrix = QMatrix::new(embedding.ty, 49152, 576, file.tensor_data(embedding)).unwrap();
    let mut row = vec![0.0f32; 576];
    matrix.row(1000, &mut row);
    assert!(row.iter().all(|v| v.is_finite()) && row.iter().any(|&v| v != 0.0));
    // Errors name the file and the key.
    let err = file.meta_u32("llama.no_such_key").unwrap_err();
    assert!(err.to_string().contains("llama.no_such_key"));
    assert!(err.to_string().contains(&path.display().to_string()));
    assert!(file.meta_u32("general.architecture").is_err());
}

fn sample_writer(data: &[u8]) -> GgufWriter<'_> {
    let mut writer = GgufWriter::new();
    writer
        .add_metadata("general.architecture", MetaValue::Str("llama".into()))
        .unwrap();
    writer.add_metadata("llama.block_count", MetaValue::U32(2)).unwrap();
    writer.add_metadata("x.i8", MetaValue::I8(-5)).unwrap();
    writer.add_metadata("x.u16", MetaValue::U16(65535)).unwrap();
    writer.add_metadata("x.i64", MetaValue::I64(-1 << 40)).unwrap();
    writer.add_metadata("x.f64", MetaValue::F64(0.1)).unwrap();
    writer.add_metadata("x.f32", MetaValue::F32(1e-5)).unwrap();
    writer.add_metadata("x.bool", MetaValue::Bool(true)).unwrap();
    writer
        .add_metadata(
            "x.strings",
            MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("ü".into())]),
        )
        .unwrap();
    writer
        .add_metadata(
            "x.nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
                MetaValue::Array(vec![]),
            ]),
        )
        .unwrap();
    writer
        .add_tensor("w.q8", &[32, 3], GgmlType::Q8_0, &data[..3 * 34])
        .unwrap();
    writer.add_tensor("w.f32", &[5], GgmlType::F32, &data[..20]).unwrap();
    writer
        .add_tensor("w.q4k", &[256, 1, 1], GgmlType::Q4K, &data[..144])
        .unwrap();
    writer
}

fn sample_bytes() -> Vec<u8> {
    (0..400u32).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn writer_round_trips_through_the_reader() {
    let data = sample_bytes();
    for alignment in [32u32, 64] {
        let mut writer = sample_writer(&data);
        writer.set_alignment(alignment).unwrap();
        let path = temp_path(&format!("roundtrip-{alignment}"));
        writer.write(&path).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version(), 3);
        assert_eq!(file.alignment(), u64::from(alignment));
        for (key, value) in &writer.metadata {
            assert_eq!(file.metadata(key), Some(value), "{key}");
        }
        assert_eq!(file.metadata(ALIGNMENT_KEY).is_some(), alignment != 32);
        assert_eq!(file.meta_u32("x.u16").unwrap(), 65535);
        assert!(file.meta_u32("x.i8").is_err());
        assert!((file.meta_f32("x.f64").unwrap() - 0.1).abs() < 1e-7);
        assert_eq!(file.tensors().len(), 3);
        for pending in &writer.tensors {
            let info = file.tensor(&pending.name).unwrap();
            assert_eq!(info.dims, pending.dims);
            assert_eq!(info.ty, pending.ty);
            assert_eq!(info.offset % u64::from(alignment), 0);
            assert_eq!(file.tensor_data(info), &pending.data[..]);
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn writer_rejects_inconsistent_input() {
    let data = sample_bytes();
    let mut writer = GgufWriter::new();
    assert!(writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..33]).is_err());
    assert!(writer.add_tensor("t", &[30], GgmlType::Q8_0, &data[..34]).is_err());
    assert!(writer.add_tensor("t", &[], GgmlType::F32, &data[..0]).is_err());
    writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..34]).unwrap();
    assert!(writer.add_tensor("t", &[32], GgmlType::Q8_0, &data[..34]).is_err());
    let mixed = MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]);
    assert!(writer.add_metadata("mixed", mixed).is_err());
    assert!(writer.add_metadata(ALIGNMENT_KEY, MetaValue::U32(64)).is_err());
    assert!(writer.set_alignment(48).is_err());
}

/// Writes the sample, applies `corrupt` to its bytes and returns the corrupted file's path.
fn corrupted_sample(name: &str, corrupt: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let data = sample_bytes();
    let path = temp_path(name);
    sample_writer(&data).write(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    corrupt(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// Position of the tensor-info entry of `name` (the u64 length before its name).
fn tensor_entry(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    bytes.windows(needle.len()).position(|w| w == needle).unwrap()
}

type Corruption = Box<dyn FnOnce(&mut Vec<u8>)>;

#[test]
fn corrupted_files_give_model_file_errors_naming_the_file() {
    let cases: Vec<(&str, Corruption, &str)> = vec![
        (
            "truncated-data",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() - 10)),
            "beyond the end",
        ),
        (
            "truncated-header",
            Box::new(|b: &mut Vec<u8>| b.truncate(60)),
            "truncated",
        ),
        ("tiny", Box::new(|b: &mut Vec<u8>| b.truncate(5)), "truncated"),
        (
            "magic",
            Box::new(|b: &mut Vec<u8>| b[..4].copy_from_slice(b"GGML")),
            "not a GGUF file",
        ),
        ("version", Box::new(|b: &mut Vec<u8>| b[4] = 7), "version 7"),
        (
            "tensor-type",
            Box::new(|b: &mut Vec<u8>| {
                // name, n_dims = 1, one dim, then the type id.
                let at = tensor_entry(b, "w.f32") + 8 + 5 + 4 + 8;
                b[at..at + 4].copy_from_slice(&4u32.to_le_bytes());
            }),
            "unsupported ggml type id 4",
        ),
        (
            "tensor-offset",
            Box::new(|b: &mut Vec<u8>| {
                let at = tensor_entry(b, "w.f32") + 8 + 5 + 4 + 8 + 4;
                b[at..at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
            }),
            "beyond the end",
        ),
        (
            "huge-tensor-count",
            Box::new(|b: &mut Vec<u8>| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())),
            "tensor count",
        ),
        (
            "huge-dimension",
            Box::new(|b: &mut Vec<u8>| {
                let at = tensor_entry(b, "w.q8") + 8 + 4 + 4 + 8;
                b[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
            }),
            "too large",
        ),
        (
            "huge-string",
            Box::new(|b: &mut Vec<u8>| {
                let at = tensor_entry(b, "w.q4k");
                b[at..at + 8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
            }),
            "tensor name",
        ),
    ];
    for (name, corrupt, problem) in cases {
        let path = corrupted_sample(name, corrupt);
        expect_model_file_error(&path, problem);
        std::fs::remove_file(&path).unwrap();
    }
    expect_model_file_error(Path::new("/nonexistent/model.gguf"), "cannot open");
}

/// Random corruption must give an error or a consistent file, never a panic or a huge
/// allocation.
#[test]
fn random_corruption_never_panics() {
    let data = sample_bytes();
    let path = temp_path("fuzz-original");
    sample_writer(&data).write(&path).unwrap();
    let original = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut opened = 0;
    for _ in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % bytes.len();
            bytes[at] = next() as u8;
        }
        if next() % 4 == 0 {
            bytes.truncate((next() as usize) % bytes.len());
        }
        if let Ok(header) = parse(&bytes) {
            opened += 1;
            for t in &header.tensors {
                assert!(t.offset as usize + t.size <= bytes.len());
            }
        }
    }
    assert!(opened > 0, "some corruptions (e.g. in tensor data) leave a valid file");
}

/// Leaves a sample at /tmp for checking with gguf-py:
/// `cargo test --release -- --ignored write_sample_for_python`.
#[test]
#[ignore]
fn write_sample_for_python() {
    let data = sample_bytes();
    let mut writer = sample_writer(&data);
    writer.set_alignment(64).unwrap();
    writer.write(Path::new("/tmp/splitwise_writer_sample.gguf")).unwrap();
}
