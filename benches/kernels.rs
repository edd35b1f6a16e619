//! Criterion benches of the CPU kernels; throughput in bytes of packed data touched.
fn main() {}
