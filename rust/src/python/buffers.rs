//! Borrowing caller tensors in place: numpy arrays through the numpy C API, torch (and any
//! other DLPack producer) through a `dltensor` capsule. Nothing is copied; the borrowed
//! object (and capsule) is held for as long as the view is used.

use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::dlpack::describe;
use super::errors::{arg_err, device_err, dtype_err, shape_err};
use crate::tensor::{DType, Data, OutData, View4};

/// A borrowed tensor.
pub struct Borrow<'py> {
    ptr: usize,
    /// Element type.
    pub dtype: DType,
    /// Sizes.
    pub shape: Vec<usize>,
    strides: Vec<usize>,
    len: usize,
    /// Whether the object is a torch tensor (outputs are made with `new_empty`).
    pub is_torch: bool,
    _keep: Vec<Bound<'py, PyAny>>,
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn is_torch(obj: &Bound<'_, PyAny>) -> bool {
    obj.get_type()
        .module()
        .map(|m| m.to_string().starts_with("torch"))
        .unwrap_or(false)
}

/// Borrows `obj` (named `arg` in errors).
pub fn borrow<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Borrow<'py>> {
    let py = obj.py();
    let expected = "a torch.Tensor or numpy.ndarray of float32, float16 or bfloat16";
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let dt = obj.getattr("dtype")?;
        let name: String = dt.getattr("name")?.extract()?;
        if !dt.getattr("isnative")?.extract::<bool>()? {
            return Err(dtype_err(
                py,
                format!("{arg}: expected native byte order, got dtype {}", dt.str()?),
            ));
        }
        let dtype = match name.as_str() {
            "float32" => DType::F32,
            "float16" => DType::F16,
            "bfloat16" => DType::BF16,
            other => {
                return Err(dtype_err(
                    py,
                    format!("{arg}: expected dtype float32, float16 or bfloat16, got {other}"),
                ))
            }
        };
        let item = if dtype == DType::F32 { 4isize } else { 2 };
        let shape = arr.shape().to_vec();
        let mut strides = Vec::new();
        for &s in arr.strides() {
            if s < 0 || s % item != 0 {
                return Err(shape_err(
                    py,
                    format!(
                        "{arg}: expected non-negative element strides, got byte strides {:?}",
                        arr.strides()
                    ),
                ));
            }
            strides.push((s / item) as usize);
        }
        // SAFETY: `arr` is a live ndarray; reading its data pointer field is what the numpy
        // C API's PyArray_DATA does.
        let ptr = unsafe { (*arr.as_array_ptr()).data } as usize;
        return finish(
            py,
            arg,
            ptr,
            dtype,
            shape,
            strides,
            false,
            vec![obj.clone()],
        );
    }
    let torch = is_torch(obj);
    if torch {
        let dev: String = obj.getattr("device")?.getattr("type")?.extract()?;
        if dev != "cpu" {
            return Err(device_err(
                py,
                format!("{arg}: expected a CPU tensor for a CPU store, got a tensor on {dev}"),
            ));
        }
    }
    if !obj.hasattr("__dlpack__")? {
        return Err(dtype_err(
            py,
            format!("{arg}: expected {expected}, got {}", type_name(obj)),
        ));
    }
    let src = if torch {
        obj.call_method0("detach")?
    } else {
        obj.clone()
    };
    // Sparse, conjugated or otherwise unexportable tensors: name the argument.
    let cap = src.call_method0("__dlpack__").map_err(|e| {
        dtype_err(
            py,
            format!("{arg}: expected a dense strided tensor that can be read in place ({e})"),
        )
    })?;
    let d = describe(&cap).ok_or_else(|| {
        dtype_err(
            py,
            format!("{arg}: its __dlpack__ did not give a dltensor capsule"),
        )
    })?;
    if d.device.device_type != 1 {
        return Err(device_err(
            py,
            format!(
                "{arg}: expected CPU memory, got DLPack device type {}",
                d.device.device_type
            ),
        ));
    }
    let dtype = match (d.dtype.code, d.dtype.bits, d.dtype.lanes) {
        (2, 32, 1) => DType::F32,
        (2, 16, 1) => DType::F16,
        (4, 16, 1) => DType::BF16,
        _ => {
            let got = obj
                .getattr("dtype")
                .map(|x| x.to_string())
                .unwrap_or_else(|_| format!("{:?}", d.dtype));
            return Err(dtype_err(
                py,
                format!("{arg}: expected dtype float32, float16 or bfloat16, got {got}"),
            ));
        }
    };
    let mut strides = Vec::new();
    for &s in &d.strides {
        if s < 0 {
            return Err(shape_err(
                py,
                format!("{arg}: expected non-negative strides, got {:?}", d.strides),
            ));
        }
        strides.push(s as usize);
    }
    let shape: Vec<usize> = d.shape.iter().map(|&s| s.max(0) as usize).collect();
    finish(
        py,
        arg,
        d.ptr,
        dtype,
        shape,
        strides,
        torch,
        vec![obj.clone(), src, cap],
    )
}

#[allow(clippy::too_many_arguments)]
fn finish<'py>(
    py: Python<'py>,
    arg: &str,
    ptr: usize,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    is_torch: bool,
    keep: Vec<Bound<'py, PyAny>>,
) -> PyResult<Borrow<'py>> {
    let item = if dtype == DType::F32 { 4 } else { 2 };
    let numel: usize = shape.iter().product();
    let len = if numel == 0 {
        0
    } else {
        let mut last = 0usize;
        for (s, st) in shape.iter().zip(&strides) {
            last = (s - 1)
                .checked_mul(*st)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| shape_err(py, format!("{arg}: strides overflow")))?;
        }
        last + 1
    };
    if len > 0 && (ptr == 0 || !ptr.is_multiple_of(item)) {
        return Err(arg_err(
            py,
            format!("{arg}: expected memory aligned to its element size"),
        ));
    }
    Ok(Borrow {
        ptr,
        dtype,
        shape,
        strides,
        len,
        is_torch,
        _keep: keep,
    })
}

impl Borrow<'_> {
    fn data(&self) -> Data<'_> {
        if self.len == 0 {
            return match self.dtype {
                DType::F32 => Data::F32(&[]),
                DType::F16 => Data::F16(&[]),
                DType::BF16 => Data::BF16(&[]),
            };
        }
        // SAFETY: `ptr` is non-null and aligned (checked in `finish`), and the producer's
        // buffer holds at least `len` elements (the largest strided offset + 1); the object
        // (and its capsule) that owns the memory is held in `_keep` while `self` lives.
        unsafe {
            match self.dtype {
                DType::F32 => {
                    Data::F32(std::slice::from_raw_parts(self.ptr as *const f32, self.len))
                }
                DType::F16 => {
                    Data::F16(std::slice::from_raw_parts(self.ptr as *const u16, self.len))
                }
                DType::BF16 => {
                    Data::BF16(std::slice::from_raw_parts(self.ptr as *const u16, self.len))
                }
            }
        }
    }

    /// A 4-D view; errors name `arg` and the expected layout.
    pub fn view4(&self, py: Python<'_>, arg: &str, expected: &str) -> PyResult<View4<'_>> {
        if self.shape.len() != 4 {
            return Err(shape_err(
                py,
                format!("{arg}: expected shape {expected}, got {:?}", self.shape),
            ));
        }
        let s = [self.shape[0], self.shape[1], self.shape[2], self.shape[3]];
        let st = [
            self.strides[0],
            self.strides[1],
            self.strides[2],
            self.strides[3],
        ];
        View4::new(arg, self.data(), s, st).map_err(|e| super::errors::to_py(py, e))
    }

    /// The buffer as a mutable contiguous output. Only for tensors this module allocated.
    pub fn out(&mut self) -> OutData<'_> {
        let n: usize = self.shape.iter().product();
        if n == 0 {
            return OutData::F32(&mut []);
        }
        // SAFETY: the output was freshly allocated by us (C-contiguous, `n` elements,
        // aligned) and nothing else references it until we return it.
        unsafe {
            match self.dtype {
                DType::F32 => OutData::F32(std::slice::from_raw_parts_mut(self.ptr as *mut f32, n)),
                DType::F16 => OutData::F16(std::slice::from_raw_parts_mut(self.ptr as *mut u16, n)),
                DType::BF16 => {
                    OutData::BF16(std::slice::from_raw_parts_mut(self.ptr as *mut u16, n))
                }
            }
        }
    }
}

/// A borrowed, writable byte pool: a C-contiguous `uint8` CPU tensor or array of two
/// dimensions.
pub struct BytePool<'py> {
    ptr: usize,
    /// `[rows, row_bytes]`.
    pub shape: [usize; 2],
    _keep: Vec<Bound<'py, PyAny>>,
}

/// Borrows a caller-owned pool (named `arg` in errors) in place; `writable`: the call writes
/// into it.
pub fn borrow_pool<'py>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    writable: bool,
) -> PyResult<BytePool<'py>> {
    let py = obj.py();
    let expected = "a C-contiguous torch.uint8 tensor or numpy uint8 array [num_blocks, block_bytes] on the CPU";
    if let Ok(arr) = obj.cast::<PyUntypedArray>() {
        let name: String = obj.getattr("dtype")?.getattr("name")?.extract()?;
        let c: bool = obj.getattr("flags")?.getattr("c_contiguous")?.extract()?;
        let w: bool = obj.getattr("flags")?.getattr("writeable")?.extract()?;
        if name != "uint8" {
            return Err(dtype_err(
                py,
                format!("{arg}: expected {expected}, got a {name} array"),
            ));
        }
        if !c || arr.shape().len() != 2 {
            return Err(shape_err(
                py,
                format!(
                    "{arg}: expected {expected}, got shape {:?}{}",
                    arr.shape(),
                    if c { "" } else { ", not C-contiguous" },
                ),
            ));
        }
        if writable && !w {
            return Err(arg_err(
                py,
                format!("{arg}: expected a writable array, got a read-only one"),
            ));
        }
        // SAFETY: `arr` is a live ndarray; reading its data pointer field is what the numpy
        // C API's PyArray_DATA does.
        let ptr = unsafe { (*arr.as_array_ptr()).data } as usize;
        let s = arr.shape();
        return Ok(BytePool {
            ptr,
            shape: [s[0], s[1]],
            _keep: vec![obj.clone()],
        });
    }
    if !is_torch(obj) || !obj.hasattr("__dlpack__")? {
        return Err(dtype_err(
            py,
            format!("{arg}: expected {expected}, got {}", type_name(obj)),
        ));
    }
    let dev: String = obj.getattr("device")?.getattr("type")?.extract()?;
    if dev != "cpu" {
        return Err(device_err(
            py,
            format!("{arg}: expected a CPU tensor (the CPU kernels), got a tensor on {dev}"),
        ));
    }
    let src = obj.call_method0("detach")?;
    let cap = src.call_method0("__dlpack__")?;
    let d = describe(&cap).ok_or_else(|| {
        dtype_err(
            py,
            format!("{arg}: its __dlpack__ did not give a dltensor capsule"),
        )
    })?;
    if (d.dtype.code, d.dtype.bits, d.dtype.lanes) != (1, 8, 1) {
        return Err(dtype_err(
            py,
            format!(
                "{arg}: expected {expected}, got dtype {}",
                obj.getattr("dtype")?
            ),
        ));
    }
    let contiguous = d.shape.len() == 2 && (d.shape[0] <= 1 || d.strides[0] == d.shape[1]);
    if !(contiguous && (d.shape[1] <= 1 || d.strides[1] == 1)) {
        return Err(shape_err(
            py,
            format!(
                "{arg}: expected {expected}, got shape {:?} with strides {:?}",
                d.shape, d.strides
            ),
        ));
    }
    Ok(BytePool {
        ptr: d.ptr,
        shape: [d.shape[0].max(0) as usize, d.shape[1].max(0) as usize],
        _keep: vec![obj.clone(), src, cap],
    })
}

impl BytePool<'_> {
    /// The pool's bytes, for reading.
    pub fn bytes(&self) -> &[u8] {
        let n = self.shape[0] * self.shape[1];
        if n == 0 {
            return &[];
        }
        // SAFETY: the producer's buffer is C-contiguous with `n` bytes (checked when
        // borrowed) and is kept alive by `_keep` while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, n) }
    }

    /// The pool's bytes, for writing in place.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.shape[0] * self.shape[1];
        if n == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`; the caller's tensor is the pool the API writes into, and
        // `&mut self` keeps this the only slice made from it while it is used.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, n) }
    }
}

impl Borrow<'_> {
    /// A 3-D `[T, H, D]` tensor as the 4-D view `[1, T, H, D]`.
    pub fn view3(&self, py: Python<'_>, arg: &str, expected: &str) -> PyResult<View4<'_>> {
        if self.shape.len() != 3 {
            return Err(shape_err(
                py,
                format!("{arg}: expected shape {expected}, got {:?}", self.shape),
            ));
        }
        let s = [1, self.shape[0], self.shape[1], self.shape[2]];
        let st = [0, self.strides[0], self.strides[1], self.strides[2]];
        View4::new(arg, self.data(), s, st).map_err(|e| super::errors::to_py(py, e))
    }
}
