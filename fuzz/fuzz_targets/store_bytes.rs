//! Arbitrary bytes as a saved store: an error or a store whose every read path works.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(store) = rotatekv::persist::from_bytes(data, "fuzz") {
        rotatekv_fuzz::exercise(&store);
    }
});
