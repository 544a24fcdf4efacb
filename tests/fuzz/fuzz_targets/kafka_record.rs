#![no_main]

#[global_allocator]
static ALLOCATOR: sluice_fuzz::Limited = sluice_fuzz::Limited;

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzz::kafka_record(data));
