fn main() {
    std::process::exit(sdtune::cli::run());
}
