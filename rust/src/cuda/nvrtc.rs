//! Compiling the kernels with NVRTC at first use, cached on disk.
//!
//! NVRTC is opened at run time. The copy that torch's CUDA wheels bring
//! (`site-packages/nvidia/cu13/lib/libnvrtc.so.13`) is not on the default library path, and
//! its builtins library must be loaded first: [`load_library`] takes that directory (the
//! Python layer finds it). The cache key covers the source, the architecture, the options
//! and the NVRTC version, so a new NVRTC or an edited kernel never reuses stale PTX.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cudarc::nvrtc::{result, sys};

use super::{full_source, KERNEL_FILES};
use crate::error::{Error, Result};

/// Options every kernel is compiled with. Quantization rounds through explicit `_rn`
/// intrinsics, so fast math elsewhere cannot change codes; `-Xptxas=-v` reports registers,
/// stack and spills in the log.
const OPTIONS: [&str; 2] = ["-std=c++17", "-Xptxas=-v"];

static LOADED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Opens the NVRTC libraries in `dir` (builtins first) so that later lookups by bare name
/// find them. Safe to call more than once.
pub fn load_library(dir: &Path) -> Result<()> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if loaded.iter().any(|d| d == dir) {
        return Ok(());
    }
    let mut found = false;
    for prefix in ["libnvrtc-builtins.so", "libnvrtc.so"] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(&dir.display().to_string(), &e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && !n.contains(".alt."))
            })
            .collect();
        names.sort();
        if let Some(p) = names.first() {
            // SAFETY: loading a shared library runs its initializers; these are NVIDIA's
            // NVRTC libraries, which have no unusual ones. The handle is leaked on purpose
            // so the library stays loaded for cudarc's lookups by name.
            let lib = unsafe { libloading::os::unix::Library::open(Some(p), 0x00102) }
                .map_err(|e| Error::device(format!("cannot load {}: {e}", p.display())))?;
            std::mem::forget(lib);
            found |= prefix == "libnvrtc.so";
        }
    }
    if !found {
        return Err(Error::device(format!(
            "nvrtc_dir: expected a directory holding libnvrtc.so*, got {}",
            dir.display()
        )));
    }
    loaded.push(dir.to_path_buf());
    Ok(())
}

/// Whether NVRTC can be opened.
pub fn available() -> bool {
    // SAFETY: only tries to open the library; never panics.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32)> {
    need()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: NVRTC is present (checked above); the pointers are valid for the call.
    unsafe { sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| Error::device(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((a, b))
}

fn need() -> Result<()> {
    if available() {
        Ok(())
    } else {
        Err(Error::device(
            "NVRTC (libnvrtc.so) was not found: install torch's CUDA build (it brings the \
             nvidia-cuda-nvrtc wheel) or put libnvrtc on LD_LIBRARY_PATH",
        ))
    }
}

/// The PTX of one kernel file and NVRTC's log (ptxas statistics included).
#[derive(Clone, Debug)]
pub struct Compiled {
    /// PTX text.
    pub ptx: String,
    /// The compiler's log.
    pub log: String,
}

fn check_arch(arch: &str) -> Result<()> {
    let ok = arch
        .strip_prefix("sm_")
        .is_some_and(|v| v.len() >= 2 && v.chars().all(|c| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(Error::value(
            "arch",
            "'sm_XY' such as 'sm_90'",
            format!("{arch:?}"),
        ))
    }
}

/// Compiles one source for `arch`.
pub fn compile_one(name: &str, src: &str, arch: &str) -> Result<Compiled> {
    check_arch(arch)?;
    need()?;
    let src = CString::new(full_source(src)).map_err(|_| Error::device("NUL in a kernel"))?;
    let cname = CString::new(name).map_err(|_| Error::device("NUL in a kernel name"))?;
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| Error::device(format!("nvrtcCreateProgram({name}): {e:?}")))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("-arch={arch}"));
    // SAFETY: `prog` is a live program created above; it is destroyed exactly once below.
    let res = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let b: Vec<u8> = l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    let out = match res {
        Ok(()) => {
            // SAFETY: as above; compilation succeeded.
            unsafe { result::get_ptx(prog) }
                .map(|p| {
                    let b: Vec<u8> = p.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    Compiled {
                        ptx: String::from_utf8_lossy(&b).into_owned(),
                        log,
                    }
                })
                .map_err(|e| Error::device(format!("nvrtcGetPTX({name}): {e:?}")))
        }
        Err(e) => Err(Error::device(format!(
            "NVRTC failed to compile {name} for {arch}: {e:?}\n{log}"
        ))),
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for b in p.iter().chain(&[0xffu8]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Where compiled PTX is cached: `$ROTATEKV_CACHE/kernels`, else
/// `~/.cache/rotatekv/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("ROTATEKV_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/rotatekv")))?;
    Some(base.join("kernels"))
}

/// Every kernel file compiled for `arch`, from the disk cache when a matching entry exists.
pub fn compile_all(arch: &str) -> Result<BTreeMap<String, Compiled>> {
    compile_all_in(arch, cache_dir().as_deref())
}

/// [`compile_all`] with the cache in `dir` (`None`: no cache). Entries read from the cache
/// have an empty log.
pub fn compile_all_in(arch: &str, dir: Option<&Path>) -> Result<BTreeMap<String, Compiled>> {
    check_arch(arch)?;
    let (ma, mi) = version()?;
    let ver = format!("{ma}.{mi}");
    let mut out = BTreeMap::new();
    for (name, src) in KERNEL_FILES {
        let key = fnv(&[
            full_source(src).as_bytes(),
            arch.as_bytes(),
            ver.as_bytes(),
            OPTIONS.join(" ").as_bytes(),
        ]);
        let path = dir.map(|d| d.join(format!("{name}-{arch}-{key:016x}.ptx")));
        if let Some(ptx) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            out.insert(
                name.to_string(),
                Compiled {
                    ptx,
                    log: String::new(),
                },
            );
            continue;
        }
        let c = compile_one(name, src, arch)?;
        if let Some(p) = &path {
            // A cache that cannot be written only costs a recompile next time.
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = crate::io::write_atomic(p, c.ptx.as_bytes());
        }
        out.insert(name.to_string(), c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's NVRTC in the repository's virtualenv (`make setup`), if there is one.
    fn venv_nvrtc() -> Option<PathBuf> {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
        std::fs::read_dir(venv)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/nvidia/cu13/lib"))
            .find(|p| p.is_dir())
    }

    #[test]
    fn compiled_ptx_is_cached_by_source_arch_and_version() {
        let Some(dir) = venv_nvrtc() else {
            eprintln!("skipped: no NVRTC in .venv (make setup installs torch's)");
            return;
        };
        load_library(&dir).unwrap();
        let cache = std::env::temp_dir().join(format!("rkv-nvrtc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let first = compile_all_in("sm_80", Some(&cache)).unwrap();
        assert_eq!(first.len(), KERNEL_FILES.len());
        assert!(first.values().all(|c| c.log.contains("ptxas info")));
        let files = std::fs::read_dir(&cache).unwrap().count();
        assert_eq!(files, KERNEL_FILES.len());
        // The second call reads the cache: same PTX, no compiler log.
        let second = compile_all_in("sm_80", Some(&cache)).unwrap();
        for (name, c) in &second {
            assert_eq!(c.ptx, first[name].ptx);
            assert!(c.log.is_empty());
        }
        // Another architecture is another entry.
        compile_all_in("sm_90", Some(&cache)).unwrap();
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            2 * KERNEL_FILES.len()
        );
        assert!(matches!(
            compile_all_in("90", Some(&cache)),
            Err(Error::Value { .. })
        ));
        let _ = std::fs::remove_dir_all(&cache);
    }
}
