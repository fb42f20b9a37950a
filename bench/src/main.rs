//! ferrotap-bench (placeholder until the benchmark lands).
fn main() {
    eprintln!("ferrotap-bench: no benchmark yet");
    std::process::exit(2);
}
