//! DLPack (legacy `dltensor` capsules): reading torch tensors in place, and exporting page
//! buffers zero-copy.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::prelude::*;

use crate::page::Page;

/// `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDevice {
    /// 1: CPU, 2: CUDA.
    pub device_type: i32,
    /// Device ordinal.
    pub device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDataType {
    /// 0 int, 1 uint, 2 float, 4 bfloat, 6 bool.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes (1).
    pub lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
#[derive(Debug)]
pub struct DLTensor {
    /// Base pointer.
    pub data: *mut c_void,
    /// Device.
    pub device: DLDevice,
    /// Dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: DLDataType,
    /// `[ndim]` sizes.
    pub shape: *mut i64,
    /// `[ndim]` strides in elements, or null for C order.
    pub strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub byte_offset: u64,
}

/// `DLManagedTensor`.
#[repr(C)]
pub struct DLManagedTensor {
    /// The tensor.
    pub dl_tensor: DLTensor,
    /// Producer's context.
    pub manager_ctx: *mut c_void,
    /// Frees the tensor.
    // SAFETY: called at most once, by whoever owns the tensor, with this struct's address.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

pub const DLTENSOR: &CStr = c"dltensor";
const USED: &CStr = c"used_dltensor";

/// What a consumer learns from a capsule.
pub struct Described {
    pub ptr: usize,
    pub device: DLDevice,
    pub dtype: DLDataType,
    pub shape: Vec<i64>,
    pub strides: Vec<i64>,
}

/// Reads the tensor description out of a live `dltensor` capsule (the capsule keeps the
/// memory alive; the caller keeps the capsule alive while it uses the pointer).
pub fn describe(capsule: &Bound<'_, PyAny>) -> Option<Described> {
    let raw = capsule.as_ptr();
    // SAFETY: `raw` is a live object borrowed from `capsule`; PyCapsule_IsValid accepts any
    // object and checks the type and name.
    if unsafe { pyo3::ffi::PyCapsule_IsValid(raw, DLTENSOR.as_ptr()) } != 1 {
        return None;
    }
    // SAFETY: validated above: a capsule named "dltensor" holds a DLManagedTensor.
    let mt = unsafe { pyo3::ffi::PyCapsule_GetPointer(raw, DLTENSOR.as_ptr()) }
        as *const DLManagedTensor;
    if mt.is_null() {
        return None;
    }
    // SAFETY: the producer guarantees the struct and its shape/strides arrays stay valid
    // while the capsule is unconsumed and alive.
    let t = unsafe { &(*mt).dl_tensor };
    let nd = t.ndim.max(0) as usize;
    if nd > 0 && t.shape.is_null() {
        return None;
    }
    // SAFETY: `shape` has `ndim` entries per the DLPack contract.
    let shape = if nd == 0 {
        vec![]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, nd) }.to_vec()
    };
    let strides = if t.strides.is_null() {
        let mut s = vec![1i64; nd];
        for i in (0..nd.saturating_sub(1)).rev() {
            s[i] = s[i + 1] * shape[i + 1];
        }
        s
    } else {
        // SAFETY: non-null strides have `ndim` entries per the DLPack contract.
        unsafe { std::slice::from_raw_parts(t.strides, nd) }.to_vec()
    };
    Some(Described {
        ptr: (t.data as usize).wrapping_add(t.byte_offset as usize),
        device: t.device,
        dtype: t.dtype,
        shape,
        strides,
    })
}

/// Keeps an exported page alive until the consumer calls the deleter.
struct Export {
    managed: DLManagedTensor,
    _page: Arc<Page>,
    shape: [i64; 1],
}

// SAFETY: called by the capsule destructor or the consumer, once, with our DLManagedTensor.
unsafe extern "C" fn export_deleter(mt: *mut DLManagedTensor) {
    if mt.is_null() {
        return;
    }
    // SAFETY: `mt` is the first field of a boxed `Export` (repr(C) not needed: we stored the
    // box pointer in manager_ctx and free that).
    let ctx = unsafe { (*mt).manager_ctx } as *mut Export;
    // SAFETY: created by Box::into_raw in `export_page` and freed exactly once, here.
    drop(unsafe { Box::from_raw(ctx) });
}

unsafe extern "C" fn capsule_destructor(cap: *mut pyo3::ffi::PyObject) {
    // An unconsumed capsule still owns the tensor; a consumer renames it "used_dltensor" and
    // takes over the deleter.
    // SAFETY: called by Python with the capsule being destroyed.
    if unsafe { pyo3::ffi::PyCapsule_IsValid(cap, DLTENSOR.as_ptr()) } == 1 {
        // SAFETY: the name matched, so the pointer is our DLManagedTensor.
        let mt = unsafe { pyo3::ffi::PyCapsule_GetPointer(cap, DLTENSOR.as_ptr()) }
            as *mut DLManagedTensor;
        // SAFETY: `mt` is live and its deleter is `export_deleter`.
        if let Some(del) = unsafe { (*mt).deleter } {
            // SAFETY: as above.
            unsafe { del(mt) };
        }
    }
    let _ = USED;
}

/// A `dltensor` capsule over a page's bytes (uint8, 1-D), keeping the page alive.
pub fn export_page<'py>(py: Python<'py>, page: Arc<Page>) -> PyResult<Bound<'py, PyAny>> {
    let len = page.nbytes();
    // A device page exports its device memory (a CUDA page as kDLCUDA).
    let (data, (device_type, device_id)) = match &page.dev {
        Some(d) => (d.ptr as *mut c_void, d.backend.dlpack_device()),
        None => (page.bytes().as_ptr() as *mut c_void, (1, 0)),
    };
    let mut ex = Box::new(Export {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data,
                device: DLDevice {
                    device_type,
                    device_id,
                },
                ndim: 1,
                dtype: DLDataType {
                    code: 1,
                    bits: 8,
                    lanes: 1,
                },
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(export_deleter),
        },
        _page: page,
        shape: [len as i64],
    });
    ex.managed.dl_tensor.shape = ex.shape.as_mut_ptr();
    let raw = Box::into_raw(ex);
    // SAFETY: `raw` is a valid, uniquely owned box until the deleter frees it.
    unsafe {
        (*raw).managed.manager_ctx = raw as *mut c_void;
    }
    // SAFETY: `raw` points at an Export whose first field is the DLManagedTensor, alive until
    // the deleter runs; the name is a static C string; the destructor is `extern "C"`.
    let cap = unsafe {
        pyo3::ffi::PyCapsule_New(
            std::ptr::addr_of_mut!((*raw).managed) as *mut c_void,
            DLTENSOR.as_ptr(),
            Some(capsule_destructor),
        )
    };
    if cap.is_null() {
        // SAFETY: the capsule was not created, so we still own the box.
        drop(unsafe { Box::from_raw(raw) });
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `cap` is a new, owned reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) })
}
