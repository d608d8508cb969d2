//! Rebuild the kernel programs when the linker changes (a new bpf-linker can change the object).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => {
            println!("cargo:warning=bpf-linker not found on PATH ({e}); run scripts/setup.sh")
        }
    }
}
