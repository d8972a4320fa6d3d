-- Admission alone (the sweeper): waiting jobs into free slots.
-- KEYS: 1 waiting, 2 active.   a: prefix, max, now
return admit(KEYS[1], KEYS[2], a.max, a.now)
