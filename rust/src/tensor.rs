//! Borrowed, strided views of caller memory (torch tensors, numpy arrays), so that inputs are
//! read where they lie instead of being copied.

use crate::error::{Error, Result};
use crate::simd::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// Element types accepted for keys, values, queries and outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// The torch-style name.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }
}

/// Borrowed elements.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 bit patterns.
    F16(&'a [u16]),
    /// bf16 bit patterns.
    BF16(&'a [u16]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::F16(s) | Data::BF16(s) => s.len(),
        }
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
        }
    }
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        match self {
            Data::F32(s) => s[i],
            Data::F16(s) => f16_to_f32(s[i]),
            Data::BF16(s) => bf16_to_f32(s[i]),
        }
    }
}

/// A 4-D strided view `[d0, d1, d2, d3]` with non-negative element strides.
#[derive(Clone, Copy, Debug)]
pub struct View4<'a> {
    /// The elements.
    pub data: Data<'a>,
    /// Sizes.
    pub shape: [usize; 4],
    /// Strides in elements.
    pub strides: [usize; 4],
}

impl<'a> View4<'a> {
    /// Checks that every index of `shape` lands inside `data`.
    pub fn new(arg: &str, data: Data<'a>, shape: [usize; 4], strides: [usize; 4]) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel > 0 {
            let mut last = 0usize;
            for (s, st) in shape.iter().zip(&strides) {
                last = s
                    .checked_sub(1)
                    .and_then(|x| x.checked_mul(*st))
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| Error::shape(arg, "strides within the buffer", "overflow"))?;
            }
            if last >= data.len() {
                return Err(Error::shape(
                    arg,
                    format!("a buffer of at least {} elements", last + 1),
                    format!("{} elements", data.len()),
                ));
            }
        }
        Ok(View4 {
            data,
            shape,
            strides,
        })
    }

    /// A C-contiguous view.
    pub fn contiguous(arg: &str, data: Data<'a>, shape: [usize; 4]) -> Result<Self> {
        let strides = [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ];
        Self::new(arg, data, shape, strides)
    }

    /// Reads `[i, j, k, :]` into `out` (length `shape[3]`) as f32.
    #[inline]
    pub fn read_row(&self, i: usize, j: usize, k: usize, out: &mut [f32]) {
        let base = i * self.strides[0] + j * self.strides[1] + k * self.strides[2];
        let st = self.strides[3];
        let n = self.shape[3];
        match (self.data, st) {
            (Data::F32(s), 1) => out.copy_from_slice(&s[base..base + n]),
            (Data::F16(s), 1) => out
                .iter_mut()
                .zip(&s[base..base + n])
                .for_each(|(o, v)| *o = f16_to_f32(*v)),
            (Data::BF16(s), 1) => out
                .iter_mut()
                .zip(&s[base..base + n])
                .for_each(|(o, v)| *o = bf16_to_f32(*v)),
            (d, _) => {
                for (x, o) in out.iter_mut().enumerate() {
                    *o = d.at(base + x * st);
                }
            }
        }
    }
}

/// A mutable C-contiguous output buffer.
#[derive(Debug)]
pub enum OutData<'a> {
    /// f32 elements.
    F32(&'a mut [f32]),
    /// f16 bit patterns.
    F16(&'a mut [u16]),
    /// bf16 bit patterns.
    BF16(&'a mut [u16]),
}

impl OutData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            OutData::F32(s) => s.len(),
            OutData::F16(s) | OutData::BF16(s) => s.len(),
        }
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes `src` at element offset `at`, converting.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            OutData::F32(s) => s[at..at + src.len()].copy_from_slice(src),
            OutData::F16(s) => s[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(o, v)| *o = f32_to_f16(*v)),
            OutData::BF16(s) => s[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(o, v)| *o = f32_to_bf16(*v)),
        }
    }
}
