//! Compiles the CUDA kernel sources as host C++ for the emulation tests (`cuda-emu`).
fn main() {
    println!("cargo:rerun-if-changed=cuda");
    if std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        cc::Build::new()
            .cpp(true)
            .file("cuda/emu/emu.cpp")
            .std("c++20")
            // The CPU path never contracts a*b+c; the emulated kernels must not either.
            .flag("-ffp-contract=off")
            .opt_level(2)
            .warnings(true)
            .compile("rotatekv_cuda_emu");
    }
}
