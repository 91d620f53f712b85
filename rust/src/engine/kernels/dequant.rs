//! Block layouts, written out once as dequantizers; the dot kernels read the same layouts.
//!
//! Each formula keeps gguf-py's order of float operations (e.g. `(d·sc)·q − dmin·m`), so the
//! results are bit-identical to its reference dequantization.

use super::{GgmlType, QK, QK_K};

#[inline(always)]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

#[inline(always)]
pub(super) fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Lengths must already agree (`src.len() == ty.row_bytes(out.len())`).
pub(super) fn dequantize_unchecked(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let blocks = src.chunks_exact(ty.block_bytes());
    let outs = out.chunks_exact_mut(ty.block_len());
    match ty {
        GgmlType::F32 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, v) in out.iter_mut().enumerate() {
                *v = f16_at(src, 2 * i);
            }
        }
        GgmlType::BF16 => {
            for (v, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *v = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        GgmlType::Q4_0 => blocks.zip(outs).for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.zip(outs).for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.zip(outs).for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.zip(outs).for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.zip(outs).for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q4K => blocks.zip(outs).for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5K => blocks.zip(outs).for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6K => blocks.zip(outs).for_each(|(b, y)| q6_k(b, y)),
    }
}

/// Q4_0: f16 d, 16 bytes of nibbles; low nibbles are elements 0..16, high nibbles 16..32.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..QK / 2 {
        y[j] = d * (i32::from(qs[j] & 0x0F) - 8) as f32;
        y[j + QK / 2] = d * (i32::from(qs[j] >> 4) - 8) as f32;
    }
}

/// Q4_1: f16 d, f16 m, nibbles as Q4_0; x = d·q + m.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..QK / 2 {
        y[j] = d * f32::from(qs[j] & 0x0F) + m;
        y[j + QK / 2] = d * f32::from(qs[j] >> 4) + m;
    }
}

/// The 5-bit values of a Q5 block: nibbles as Q4_0 plus bit j of the u32 `qh` as bit 4.
#[inline(always)]
pub(super) fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0x0F) | ((((high >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((high >> (j + QK / 2)) & 1) as u8) << 4);
    }
    q
}

/// Q5_0: f16 d, u32 high bits, nibbles; x = d·(q − 16).
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let q = q5_values(&b[2..6], &b[6..22]);
    for (v, &q) in y.iter_mut().zip(&q) {
        *v = d * (i32::from(q) - 16) as f32;
    }
}

/// Q5_1: f16 d, f16 m, u32 high bits, nibbles; x = d·q + m.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let q = q5_values(&b[4..8], &b[8..24]);
    for (v, &q) in y.iter_mut().zip(&q) {
        *v = d * f32::from(q) + m;
    }
}

/// Q8_0: f16 d, 32 signed bytes.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = f32::from(q as i8) * d;
    }
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes: bytes
/// 0..4 hold scales 0..4 (low 6 bits), 4..8 minimums 0..4, and 8..12 the low nibbles of scales
/// 4..8 and minimums 4..8 whose top 2 bits sit in the spare bits of bytes 0..8.
#[inline(always)]
pub(super) fn k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 0x3F;
        mins[j] = packed[j + 4] & 0x3F;
        scales[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles; each 32 bytes of nibbles
/// carry two sub-blocks of 32 (low nibbles first), x = (d·sc)·q − dmin·m.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, mins) = k_scales_mins(&b[4..16]);
    let qs = &b[16..144];
    for (sub, y) in y.chunks_exact_mut(32).enumerate() {
        let scale = d * f32::from(scales[sub]);
        let min = dmin * f32::from(mins[sub]);
        let shift = 4 * (sub % 2);
        let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for (v, &q) in y.iter_mut().zip(q) {
            *v = scale * f32::from((q >> shift) & 0x0F) - min;
        }
    }
}

/// Q5_K: as Q4_K plus 32 bytes of high bits after the scales; bit `sub` of byte l is bit 4 of
/// element l of sub-block `sub`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, mins) = k_scales_mins(&b[4..16]);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (sub, y) in y.chunks_exact_mut(32).enumerate() {
        let scale = d * f32::from(scales[sub]);
        let min = dmin * f32::from(mins[sub]);
        let shift = 4 * (sub % 2);
        let q = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        for ((v, &q), &h) in y.iter_mut().zip(q).zip(qh) {
            let q = ((q >> shift) & 0x0F) | (((h >> sub) & 1) << 4);
            *v = scale * f32::from(q) - min;
        }
    }
}

/// The 6-bit value of element `e` (0..256) of a Q6_K super-block, before the offset of 32.
/// Each half of 128 elements uses 64 bytes of `ql` and 32 of `qh`; its quarter k takes the
/// low (k < 2) or high nibble of `ql` and bits 2k..2k+2 of `qh`.
#[inline(always)]
fn q6_value(ql: &[u8], qh: &[u8], e: usize) -> u8 {
    let half = e / 128;
    let quarter = (e % 128) / 32;
    let l = e % 32;
    let low_byte = ql[64 * half + 32 * (quarter % 2) + l];
    let low = (low_byte >> (4 * (quarter / 2))) & 0x0F;
    let high = (qh[32 * half + l] >> (2 * quarter)) & 0x03;
    low | (high << 4)
}

/// Q6_K: 128 bytes `ql`, 64 bytes `qh`, 16 signed scales (one per 16 elements), f16 d;
/// x = (d·sc)·(q − 32).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (e, v) in y.iter_mut().enumerate().take(QK_K) {
        let scale = d * f32::from(scales[e / 16] as i8);
        *v = scale * f32::from(q6_value(ql, qh, e) as i8 - 32);
    }
}
