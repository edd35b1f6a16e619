//! Compiles the CUDA kernel sources as host C++ for the emulation tests (`cuda-emu`).
fn main() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=rust/src/format.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA_EMU").is_some() {
        cc::Build::new()
            .define("RKV_NUM_CLASSES", num_classes().to_string().as_str())
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

/// The number of precision classes, read from the one format table (`CLASS_BITS` in
/// rust/src/format.rs), so the emulated header is sized as the crate is.
fn num_classes() -> usize {
    let src = std::fs::read_to_string("rust/src/format.rs").expect("rust/src/format.rs");
    let line = src
        .lines()
        .find(|l| l.starts_with("pub const CLASS_BITS: [u8; "))
        .expect("CLASS_BITS in rust/src/format.rs");
    let list = &line[line.find("= [").expect("CLASS_BITS list") + 3..line.rfind(']').expect("]")];
    list.split(',').filter(|x| !x.trim().is_empty()).count()
}
