//! Packing: every row of codes at every width packs and unpacks back to itself, through both
//! unpackers; rows of any length are refused or handled, never read out of bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rotatekv::format::packed_row_bytes;
use rotatekv::quant::{pack_row, unpack_row, unpack_row_f32};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let bits = [2u8, 3, 4, 8][sel as usize % 4];
    let n = rest.len() / 8 * 8;
    let codes: Vec<u8> = rest[..n]
        .iter()
        .map(|c| c & ((1u16 << bits) - 1) as u8)
        .collect();
    let mut packed = vec![0u8; packed_row_bytes(n, bits)];
    pack_row(&codes, bits, &mut packed);
    let mut back = vec![0u8; n];
    unpack_row(&packed, bits, &mut back);
    assert_eq!(back, codes, "bits={bits} n={n}");
    let mut f = vec![0f32; n];
    unpack_row_f32(&packed, bits, &mut f);
    assert!(
        f.iter().zip(&codes).all(|(a, &c)| *a == c as f32),
        "f32 bits={bits}"
    );
});
