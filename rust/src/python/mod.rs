//! The PyO3 layer: the only module that imports pyo3. Thin: argument conversion, GIL release
//! and error mapping; all logic lives in the core modules.

mod buffers;
mod classes;
mod dlpack;
mod errors;

use pyo3::prelude::*;

/// Runtime information for bug reports and tests.
#[pyfunction]
fn build_info() -> std::collections::HashMap<&'static str, String> {
    let mut m = std::collections::HashMap::new();
    m.insert("version", env!("CARGO_PKG_VERSION").to_string());
    m.insert("simd", format!("{:?}", crate::simd::level()).to_lowercase());
    m.insert("threads", rayon::current_num_threads().to_string());
    m
}

/// Orthonormal Walsh-Hadamard transform of the last axis of a float32 array (a reference
/// and a convenience; the store applies its rotations itself).
#[pyfunction]
#[pyo3(signature = (x, inverse=false))]
fn hadamard<'py>(
    py: Python<'py>,
    x: Bound<'py, PyAny>,
    inverse: bool,
) -> PyResult<Bound<'py, numpy::PyArrayDyn<f32>>> {
    use numpy::{PyArrayMethods, PyUntypedArrayMethods, ToPyArray};
    let arr = py
        .import("numpy")?
        .call_method1("asarray", (&x, "float32"))
        .map_err(|_| {
            errors::dtype_err(
                py,
                format!("x: expected a float array, got {}", x.get_type()),
            )
        })?;
    let x: numpy::PyReadonlyArrayDyn<'py, f32> = arr.extract()?;
    if x.ndim() == 0 {
        return Err(errors::shape_err(
            py,
            "x: expected at least one axis, got a scalar".into(),
        ));
    }
    let shape = x.shape().to_vec();
    let n = *shape.last().unwrap_or(&0);
    let h = crate::Hadamard::new(n).map_err(|e| errors::to_py(py, e))?;
    let mut data = x.as_array().iter().copied().collect::<Vec<f32>>();
    for row in data.chunks_exact_mut(n.max(1)) {
        if inverse {
            h.inverse(row)
        } else {
            h.forward(row)
        }
    }
    data.to_pyarray(py).reshape(shape)
}

#[pymodule]
fn _rotatekv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<classes::PyPlan>()?;
    m.add_class::<classes::PyStore>()?;
    m.add_class::<classes::PyPageBuffer>()?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard, m)?)?;
    Ok(())
}
