#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| etcd_proxy::fuzzing::spdy_frame(data));
