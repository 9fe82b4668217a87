"""The steps the airline conversation scripts (airline.py) share: verify the customer, find the
reservation, offer and choose flights."""

from __future__ import annotations

from typing import Any

from data.synthetic.world import Dialogue, listing, money, sentences


def people(count: int) -> str:
    return f"{count} passenger" + ("s" if count > 1 else "")


class AirlineSteps:
    """The steps every airline intent shares: verification, finding the reservation, choosing a flight."""

    def __init__(self, dlg: Dialogue) -> None:
        self.dlg = dlg
        self.rng = dlg.rng
        self.customer = next(iter(dlg.db["customers"].values()))
        self.upfront_auth = self.rng.random() < 0.75
        self.tier: str | None = None

    def auth_sentence(self) -> str:
        customer = self.customer
        return self.dlg.pick(("My customer id is {cid}, last name {last}.", "I'm {first} {last}, id {cid}.",
                              "Customer {cid}, {first} {last}.", "Last name {last}, customer id {cid}."),
                             cid=customer["customer_id"], first=customer["first_name"], last=customer["last_name"])

    def open_request(self, first: bool, request: str, goal: str, reservation_id: str | None,
                     can_search: bool = False) -> None:
        """The request, then verification and the reservation id when they are missing.

        can_search: the user named the destination instead of the id, so the policy says to find the
        reservation (the caller does) rather than ask for the id.
        """
        dlg = self.dlg
        needs_auth = dlg.authenticated is None
        gave_auth = needs_auth and first and self.upfront_auth
        dlg.user(sentences(dlg, [request, self.auth_sentence()]) if gave_auth else request)
        missing = reservation_id is not None and reservation_id not in request and not can_search
        if needs_auth and not gave_auth:
            with_id = missing and self.rng.random() < 0.5
            wanted = "customer id and last name" + (", and the reservation id" if with_id else "")
            ask = "your " + wanted
            dlg.say(dlg.pick(("Sure. First I need {ask}.", "I can help. Please give me {ask}.",
                              "Happy to help; could you share {ask}?"), ask=ask),
                    f"The user wants to {goal} but is not verified. The policy requires verification first, so "
                    f"I ask for their {wanted}.")
            parts = [self.auth_sentence()]
            if with_id:
                parts.append(dlg.pick(("Reservation {rid}.", "The booking is {rid}."), rid=reservation_id))
                missing = False
            dlg.user(sentences(dlg, parts))
        if needs_auth:
            customer = self.customer
            result = dlg.call("verify_customer",
                              {"customer_id": customer["customer_id"], "last_name": customer["last_name"]},
                              f"The user gave customer id {customer['customer_id']} and last name "
                              f"{customer['last_name']}. I must verify them first, so I call verify_customer.")
            self.tier = result["tier"]
        if missing:
            dlg.say(dlg.pick(("Which reservation is it? Please give me the reservation id.",
                              "Could you tell me the reservation id?")),
                    f"The customer {dlg.authenticated} is verified and wants to {goal}, but gave no reservation "
                    "id. I ask for it rather than guess.")
            dlg.user(dlg.pick(("It's {rid}.", "{rid}.", "Reservation {rid}."), rid=reservation_id))

    def reservation_phrase(self, reservation_id: str, with_id: tuple[str, ...], without_id: tuple[str, ...],
                           **slots: Any) -> str:
        templates = with_id if self.rng.random() < 0.75 else without_id
        return self.dlg.pick(templates, rid=reservation_id, **slots)

    def find_reservation(self, first: bool, reservation: dict[str, Any], goal: str, purpose: str,
                         with_id: tuple[str, ...], by_place: tuple[str, ...], without_id: tuple[str, ...],
                         **slots: Any) -> dict[str, Any]:
        """The request (naming the reservation id 65%, its destination 20%, nothing 15%), verification,
        then the reservation read with get_reservation, or found among the customer's reservations."""
        roll = self.rng.random()
        templates = with_id if roll < 0.65 else by_place if roll < 0.85 else without_id
        rid, destination = reservation["reservation_id"], reservation["destination"]
        request = self.dlg.pick(templates, rid=rid, dest=destination, **slots)
        by_destination = templates is by_place
        self.open_request(first, request, goal, rid, can_search=by_destination)
        if not by_destination:
            return self.look_up(rid, purpose)
        dlg = self.dlg
        result = dlg.call("get_customer", {"customer_id": dlg.authenticated},
                          f"The customer {dlg.authenticated} is verified and wants to {goal} for the trip to "
                          f"{destination}, without a reservation id. I call get_customer to list reservations.")
        checked: list[str] = []
        for candidate in result["reservations"]:
            reasoning = (f"Reservation {checked[-1]} does not fly to {destination}. I check the next one, "
                         f"{candidate}, with get_reservation." if checked else
                         f"get_customer lists {listing(result['reservations'])}. To find the trip to {destination} "
                         f"I call get_reservation on the first, {candidate}.")
            current = dlg.call("get_reservation", {"reservation_id": candidate}, reasoning)
            if current["destination"] == destination:
                return current
            checked.append(candidate)
        raise RuntimeError(f"no reservation to {destination}")  # make_db books each route at most once

    def look_up(self, reservation_id: str, why: str) -> dict[str, Any]:
        return self.dlg.call("get_reservation", {"reservation_id": reservation_id},
                             f"The customer {self.dlg.authenticated} is verified and named reservation "
                             f"{reservation_id}. I call get_reservation to {why}.")

    def pick_reservation(self, fits: Any, bias: float = 0.65) -> dict[str, Any]:
        reservations = [self.dlg.db["reservations"][rid] for rid in self.customer["reservations"]
                        if rid in self.dlg.db["reservations"]]
        fitting = [reservation for reservation in reservations if fits(reservation)]
        return self.rng.choice(fitting if fitting and self.rng.random() < bias else reservations)

    def flight_options(self, search: dict[str, Any], exclude: str | None, passengers: int) -> list[dict[str, Any]]:
        return [flight for flight in search["flights"] if flight["flight_id"] != exclude
                and flight["seats"] >= passengers]

    @staticmethod
    def describe(flights: list[dict[str, Any]]) -> str:
        return listing([f"{flight['flight_id']} at {flight['depart']} for {money(flight['price'])}"
                        for flight in flights])

    def preference(self) -> tuple[str | None, str]:
        """Half the users say upfront which flight they want (earliest, latest, cheapest): (key, sentence)."""
        key = self.rng.choice((None, None, None, "earliest", "latest", "cheapest"))
        if key is None:
            return None, ""
        return key, self.dlg.pick(("The {key} flight is fine.", "I'd like the {key} one.", "Give me the {key} option."),
                                  key=key)

    def choose_flight(self, options: list[dict[str, Any]], preference: str | None,
                      listed_reasoning: str) -> tuple[dict[str, Any], str]:
        """The flight to act on, and why: the user's stated preference applied to the options, or
        (no preference) the assistant lists the options and the user picks one by id or time."""
        if preference == "earliest":
            chosen = min(options, key=lambda flight: flight["depart"])
        elif preference == "latest":
            chosen = max(options, key=lambda flight: flight["depart"])
        elif preference == "cheapest":
            chosen = min(options, key=lambda flight: (flight["price"], flight["depart"]))
        else:
            self.dlg.say(self.dlg.pick(("I found {options} per passenger. Which one would you like?",
                                        "Available: {options} per seat. Which flight?"), options=self.describe(options)),
                         listed_reasoning)
            chosen = self.rng.choice(options)
            self.dlg.user(self.dlg.pick(("{fid}, please.", "The {time} one.", "I'll take {fid}.",
                                         "Let's do the {time} flight."), fid=chosen["flight_id"], time=chosen["depart"]))
            return chosen, f"The user chose {chosen['flight_id']}."
        detail = f"{money(chosen['price'])}" if preference == "cheapest" else f"departing {chosen['depart']}"
        return chosen, (f"Of the {len(options)} flight(s) with enough seats, the {preference} is "
                        f"{chosen['flight_id']}, {detail}.")
