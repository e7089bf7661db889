fn main() {
    std::process::exit(mybox::cli::main());
}
