//! The commands of the `livegrid` binary, one module each.

pub mod match_docs;
pub mod record;
pub mod replay;
pub mod serve;
pub mod workload;

/// Reads a cluster's hostfile (`host:port` lines, line i being process i's address; blank
/// lines are skipped) and checks that `process` is one of its processes.
pub fn read_hostfile(path: &std::path::Path, process: usize) -> Result<livegrid_engine::ClusterConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let addresses: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if let Some(bad) =
        addresses.iter().find(|a| a.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()))
    {
        return Err(format!("{}: {bad:?} is not host:port", path.display()));
    }
    if process >= addresses.len() {
        return Err(format!(
            "--process {process} but the hostfile {} names {} processes",
            path.display(),
            addresses.len()
        ));
    }
    Ok(livegrid_engine::ClusterConfig { process, addresses })
}
