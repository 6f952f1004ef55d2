use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    runner::cpu::keep_freed_memory();
    let cli = runner::cli::Cli::parse();
    runner::logging::init();
    match runner::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            runner::logging::progress_done();
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
