//! Events as kubelet's evented PLEG reads them: CRI `GetContainerEvents` over the
//! socket, with the pod's and containers' statuses in each event.

use super::*;

type EventStream = tonic::Streaming<cri::ContainerEventResponse>;

/// A `GetContainerEvents` stream, subscribed before it returns.
pub(super) async fn subscribe(c: &mut CriClient) -> Result<EventStream> {
    Ok(c.runtime
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner())
}

/// The next `n` events as (id, type), each checked against its statuses.
async fn next_events(
    s: &mut EventStream,
    n: usize,
) -> Result<Vec<(String, i32, cri::ContainerEventResponse)>> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .with_context(|| {
                format!(
                    "no event after {out:?}",
                    out = out
                        .iter()
                        .map(|e: &(String, i32, _)| (e.0.clone(), e.1))
                        .collect::<Vec<_>>()
                )
            })??
            .context("the stream ended")?;
        ensure!(ev.created_at > 0, "{ev:?}");
        out.push((ev.container_id.clone(), ev.container_event_type, ev));
    }
    Ok(out)
}

pub fn container_events_follow_a_pod_lifecycle() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("events"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        // Two streams at once; both see everything, in order. Each step's events are
        // read before the next step, since statuses are read when an event is sent.
        let mut streams = [subscribe(&mut c).await?, subscribe(&mut c).await?];
        let logs = b.dir().join("logs");
        let cfg = container_pod("events", "ev-1", &logs);
        let pod = run_pod(&mut c, cfg.clone()).await?;
        let sleeper = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let ctr = create_and_start(&mut c, &pod, &cfg, sleeper).await?;
        use cri::ContainerEventType as T;
        let (running, exited) = (
            cri::ContainerState::ContainerRunning as i32,
            cri::ContainerState::ContainerExited as i32,
        );
        let ready = cri::PodSandboxState::SandboxReady as i32;
        let steps: [(&[(&str, T)], Option<i32>, Option<i32>); 5] = [
            (
                &[
                    (&pod, T::ContainerCreatedEvent),
                    (&pod, T::ContainerStartedEvent),
                    (&ctr, T::ContainerCreatedEvent),
                    (&ctr, T::ContainerStartedEvent),
                ],
                Some(running),
                Some(ready),
            ),
            (
                &[(&ctr, T::ContainerStoppedEvent)],
                Some(exited),
                Some(ready),
            ),
            (&[(&ctr, T::ContainerDeletedEvent)], None, Some(ready)),
            (
                &[(&pod, T::ContainerStoppedEvent)],
                None,
                Some(cri::PodSandboxState::SandboxNotready as i32),
            ),
            (&[(&pod, T::ContainerDeletedEvent)], None, None),
        ];
        for (i, (want, ctr_state, pod_state)) in steps.iter().enumerate() {
            match i {
                1 => stop_ctr(&mut c, &ctr).await?,
                2 => remove_ctr(&mut c, &ctr).await?,
                3 => stop_pod(&mut c, &pod).await?,
                4 => remove_pod(&mut c, &pod).await?,
                _ => {}
            }
            for s in streams.iter_mut() {
                let got = next_events(s, want.len()).await?;
                let seen: Vec<(String, i32)> = got.iter().map(|e| (e.0.clone(), e.1)).collect();
                let expected: Vec<(String, i32)> = want
                    .iter()
                    .map(|(id, t)| (id.to_string(), *t as i32))
                    .collect();
                ensure!(
                    seen == expected,
                    "step {i}: events {seen:?}, want {expected:?}"
                );
                let last = &got[got.len() - 1].2;
                let state = last
                    .containers_statuses
                    .iter()
                    .find(|s| s.id == ctr)
                    .map(|s| s.state);
                ensure!(
                    state == *ctr_state,
                    "step {i}: container {state:?} in {last:?}"
                );
                let pod_now = last.pod_sandbox_status.as_ref().map(|p| p.state);
                ensure!(
                    pod_now == *pod_state,
                    "step {i}: pod {pod_now:?} in {last:?}"
                );
            }
        }
        assert_no_pod_leftovers(&b, "events")?;
        Ok(())
    })
}

async fn stop_ctr(c: &mut CriClient, id: &str) -> Result<()> {
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: id.into(),
            timeout: 0,
        })
        .await?;
    Ok(())
}

async fn remove_ctr(c: &mut CriClient, id: &str) -> Result<()> {
    c.runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: id.into(),
        })
        .await?;
    Ok(())
}
