-- One round trip for /v1/status. On a replica the "current" position is the last received
-- and the "flushed" one the last replayed.
SELECT
    pg_is_in_recovery() AS in_recovery,
    current_setting('server_version') AS server_version,
    CASE WHEN pg_is_in_recovery()
         THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text
         ELSE pg_current_wal_insert_lsn()::text END AS current_lsn,
    CASE WHEN pg_is_in_recovery()
         THEN pg_last_wal_replay_lsn()::text
         ELSE pg_current_wal_flush_lsn()::text END AS flushed_lsn,
    CASE WHEN pg_is_in_recovery()
         THEN (SELECT timeline_id FROM pg_control_checkpoint())
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int END AS timeline
