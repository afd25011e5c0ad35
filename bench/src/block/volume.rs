//! Volumes through `VolumeService` (the API any node answers), and the lines
//! the leader's volume controller logs while it re-replicates.

use std::time::Duration;

use anyhow::{Context, bail};
use nodeos_proto::v1::volume_service_client::VolumeServiceClient;
use nodeos_proto::v1::{CreateVolumeRequest, ListVolumesRequest, Volume, VolumeDetail, VolumeRef};
use tonic::transport::Channel;

use super::strip_ansi;
use crate::nodeos::channel;

/// A `VolumeService` client on one node.
#[derive(Debug, Clone)]
pub struct Volumes(VolumeServiceClient<Channel>);

/// Longest wait for one API call.
const CALL_LIMIT: Duration = Duration::from_secs(30);

impl Volumes {
    pub async fn connect(api_addr: &str) -> anyhow::Result<Self> {
        Ok(Volumes(VolumeServiceClient::new(channel(api_addr).await?)))
    }

    pub async fn create(&mut self, name: &str, size_bytes: u64, replicas: u32) -> anyhow::Result<Volume> {
        let req = CreateVolumeRequest { name: name.into(), size_bytes, replicas };
        let v = tokio::time::timeout(CALL_LIMIT, self.0.create(req))
            .await
            .context("VolumeService.Create timed out")?;
        Ok(v.context("VolumeService.Create")?.into_inner())
    }

    /// The volume's record (placement, writer, warning) from `List`, which
    /// asks no replica anything.
    pub async fn record(&mut self, name: &str) -> anyhow::Result<Volume> {
        let l = tokio::time::timeout(CALL_LIMIT, self.0.list(ListVolumesRequest {}))
            .await
            .context("VolumeService.List timed out")?;
        let l = l.context("VolumeService.List")?.into_inner();
        l.volumes.into_iter().find(|v| v.name == name).with_context(|| format!("no volume {name}"))
    }

    /// The record with every copy's health (`Get`: digests from each replica).
    pub async fn detail(&mut self, name: &str) -> anyhow::Result<VolumeDetail> {
        let d = tokio::time::timeout(CALL_LIMIT, self.0.get(VolumeRef { volume: name.into() }))
            .await
            .context("VolumeService.Get timed out")?;
        Ok(d.context("VolumeService.Get")?.into_inner())
    }
}

/// Whether every extent of `d` has exactly `replicas` copies, all in-sync,
/// and health for every extent was reported.
pub fn all_in_sync(d: &VolumeDetail, replicas: usize) -> bool {
    let extents = d.volume.as_ref().map_or(0, |v| v.placement.len());
    d.extents.len() == extents
        && d.extents
            .iter()
            .all(|e| e.copies.len() == replicas && e.copies.iter().all(|c| c.state == "in-sync"))
}

/// Copies per state over all extents ("in-sync" -> 30, ...), for progress lines.
pub fn state_counts(d: &VolumeDetail) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in d.extents.iter().flat_map(|e| &e.copies) {
        *counts.entry(c.state.as_str()).or_default() += 1;
    }
    counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", ")
}

/// Bytes of `[0, filled)` that fall in each of `extents` extents of `extent_size`.
pub fn filled_per_extent(extent_size: u64, extents: usize, filled: u64) -> Vec<u64> {
    (0..extents as u64).map(|e| filled.saturating_sub(e * extent_size).min(extent_size)).collect()
}

/// One `copies repaired` line of the volume controller.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairLine {
    pub at_unix_ms: u64,
    pub extent: u32,
    pub blocks: u64,
    /// The controller's own figure for this extent.
    pub mib_per_s: f64,
}

/// What the controller logged about `volume_id` at or after `since_unix_ms`:
/// the times of its `node lost; re-replicating` lines and its
/// `copies repaired` lines.
pub fn controller_lines(log: &str, volume_id: &str, since_unix_ms: u64) -> (Vec<u64>, Vec<RepairLine>) {
    let (mut lost, mut repaired) = (Vec::new(), Vec::new());
    for raw in log.lines() {
        let line = strip_ansi(raw);
        if field(&line, "volume") != Some(volume_id) {
            continue;
        }
        let Some(at) = line.split_whitespace().next().and_then(parse_utc_ms) else { continue };
        if at < since_unix_ms {
            continue;
        }
        if line.contains("node lost; re-replicating") {
            lost.push(at);
        } else if line.contains("copies repaired") {
            let num = |k: &str| field(&line, k).and_then(|v| v.parse::<f64>().ok());
            if let (Some(e), Some(b), Some(r)) = (num("extent"), num("blocks"), num("mib_per_s")) {
                repaired.push(RepairLine {
                    at_unix_ms: at,
                    extent: e as u32,
                    blocks: b as u64,
                    mib_per_s: r,
                });
            }
        }
    }
    (lost, repaired)
}

/// The value of ` key=value` or ` key="value"` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    match rest.strip_prefix('"') {
        Some(q) => q.split('"').next(),
        None => rest.split_whitespace().next(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac]Z` as Unix milliseconds.
fn parse_utc_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    // Days from 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let total = ((days * 24 + hh) * 60 + mm) * 60 + ss;
    u64::try_from(total * 1000 + ms).ok()
}

/// Fails unless `d`'s placement no longer names `node` anywhere.
pub fn check_not_placed(v: &Volume, node: &str) -> anyhow::Result<()> {
    if v.placement.iter().any(|p| p.node_ids.iter().any(|n| n == node)) {
        bail!("volume {} still places copies on {node}", v.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utc_timestamps() {
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc_ms("2000-03-01T00:00:01.5Z"), Some(951_868_801_500));
        assert_eq!(parse_utc_ms("2026-11-24T02:28:51.298361Z"), Some(1_795_487_331_298));
        assert_eq!(parse_utc_ms("garbage"), None);
    }

    #[test]
    fn reads_controller_lines() {
        let log = "\u{1b}[2m2026-11-24T02:28:50.455260Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x: node lost; \
                   re-replicating its copy \u{1b}[3mvolume\u{1b}[0m\u{1b}[2m=\u{1b}[0md0c0 extent=0\n\
                   2026-11-24T02:28:51.298361Z  INFO x: copies repaired volume=d0c0 extent=3 \
                   layer=\"d00c\" blocks=16384 mib_per_s=\"76.5\"\n\
                   2026-11-24T02:28:51.298361Z  INFO x: copies repaired volume=other extent=1 blocks=1 mib_per_s=\"1\"\n";
        let (lost, rep) = controller_lines(log, "d0c0", 0);
        assert_eq!(lost, vec![1_795_487_330_455]);
        assert_eq!(
            rep,
            vec![RepairLine { at_unix_ms: 1_795_487_331_298, extent: 3, blocks: 16384, mib_per_s: 76.5 }]
        );
        assert!(controller_lines(log, "d0c0", 1_795_487_331_299).1.is_empty());
    }

    #[test]
    fn splits_the_fill_over_extents() {
        assert_eq!(filled_per_extent(64, 4, 150), vec![64, 64, 22, 0]);
    }
}
