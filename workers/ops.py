"""The pipe vocabulary between the gateway and its workers: the names of CONTROL frames, defined once.

A leaf module (no project imports), shared by the gateway side and by every worker process.
"""

from __future__ import annotations

import enum


class Op(enum.StrEnum):
    # gateway -> agent worker
    INIT = "init"  #: {agent, options, cwd, session_id, state_frame?}: load the agent (then STATE: its last snapshot)
    PROMPT = "prompt"  #: {turn_id, text}: run one turn
    CANCEL = "cancel"  #: {turn_id}: stop the running turn
    # agent worker -> gateway
    READY = "ready"  #: {pid, agent}: the agent is loaded and takes prompts (slash worker: {pid})
    INIT_FAILED = "init_failed"  #: {code, message, bad_state?}: the agent could not be loaded
    STATE = "state"  #: {state}: the agent's snapshot after a turn, sent before that turn's turn.complete;
    #: gateway -> agent worker, right after an init with state_frame: the snapshot's value itself
    # gateway -> slash worker, and its answer
    EXEC = "exec"  #: {id, command, snapshot}
    RESULT = "result"  #: {id, ok, output}
