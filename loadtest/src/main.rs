//! tether-loadtest: the load generator (its scenarios land with the load-tool issue).

fn main() {
    eprintln!("tether-loadtest: no scenarios yet; see docs/LOADTEST.md once the load tool lands");
    std::process::exit(2);
}
