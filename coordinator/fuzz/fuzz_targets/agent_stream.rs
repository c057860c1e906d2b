//! libFuzzer entry point: see `berth_coordinator::fuzzing` for the input
//! format and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_coordinator::fuzzing::agent_stream(data);
});
